"""fp32 rounding-error bounds for the tests: tolerances come from error bounds, not from trial.

u = 2^-24 is fp32's unit roundoff: one correctly rounded operation (+ - * /, sqrt, the
conversion of a Python float to fp32) is off by at most u relative, and k of them in a chain
by at most gamma_k = k u / (1 - k u) (Higham, Accuracy and Stability of Numerical Algorithms,
2002, sec. 3.1). Two fp32 evaluations that are each within e of the exact value differ by at
most 2 e. tests/test_ladder_cpu_kernels.py, test_attention.py and test_model.py derive their
own bounds the same way; the helpers here are those that several test files share.
"""

import numpy as np
import pytest

from research.config import ScheduleConfig

U = 2.0**-24  # fp32 unit roundoff
# XLA's fp32 cos on CPU, absolute error on [0, pi] (measured: 0.55 u, eager and under jit;
# test_optim checks the assumption on a grid): 2 ulps of a value below 1.
E_COS = 2 * U


def gamma(k: int) -> float:
    """Higham's gamma_k: the relative error bound of k successive fp32 roundings."""
    return k * U / (1 - k * U)


def assert_close_to_bound(actual, reference, bound, err_msg: str = "") -> None:
    """|actual - reference| <= bound elementwise (NaN fails), in float64."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    diff = np.abs(actual - reference)
    bound = np.broadcast_to(np.asarray(bound, np.float64), diff.shape)
    bad = ~(diff <= bound)
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bad, np.nan_to_num(diff / bound, nan=np.inf), -np.inf)
        worst = np.unravel_index(np.argmax(ratio), diff.shape)
        raise AssertionError(f"{bad.sum()} of {diff.size} elements beyond the fp32 bound; worst at "
                             f"{worst}: |{actual[worst]} - {reference[worst]}| = {diff[worst]:.3g} > "
                             f"{bound[worst]:.3g}" + (f" ({err_msg})" if err_msg else ""))


def assert_bound_catches(wrong, reference, bound) -> None:
    """The bound is tight enough to reject `wrong` (the test can fail)."""
    with pytest.raises(AssertionError, match="beyond the fp32 bound"):
        assert_close_to_bound(wrong, reference, bound)


def lr_bound(s: ScheduleConfig, lr: float, steps: int, step) -> tuple[np.ndarray, np.ndarray]:
    """(exact lr, bound on |fp32 lr - exact lr|) at `step` of optim.make_schedule(s, lr, steps).

    First order in u (the O(u^2) terms are ~1e-7 of the bound), operation by operation through
    optim.py's formulas:
    - the step (an integer below 2^24, or a half-integer) is exact in fp32, and so are
      step + 1, step - start and every clip, min and max;
    - each Python float (lr, floor, lr - floor, (lr - floor) / 2, pi) is rounded to fp32 once:
      u relative (Python's float64 arithmetic on them is 2^-29 of that, ignored);
    - a division counts 2 u: XLA may compile x / c as x * fl(1 / c) (jit and eager do differ in
      the last bit), and sqrt (u) halves its argument's relative error;
    - cos adds E_COS, plus |sin x| times the absolute error of its argument x.
    Warmup w = min(1, (step + 1) / warmup) is off by 2 u w (exactly 1 once step + 1 > warmup,
    where the quotient is >= 1 + 1/warmup); lr = w * body: w's error times the body, the body's
    times w, and u of the product. The bodies (b, its error e_b):
      constant  fl(lr): u lr.
      rsqrt     lr sqrt(c / max(step + 1, c)): the quotient's 2 u halved, sqrt, lr, product: 4 u b.
      wsd       lr - p, p = (lr - floor) t, t = clip((step - start) / (D - 1)) off by 2 u t:
                p by 4 u p (t, the constant, the product); then lr's u lr and u b.
      cosine    floor + A (1 + cos(pi t)), A = (lr - floor) / 2: x = pi t off by 4 u pi t (t, pi,
                product); cos by |sin x| that + E_COS; 1 + cos by u (1 + c) more; A's conversion
                and the product 2 u A (1 + c); floor's conversion u floor and the sum u b.
    """
    x = np.asarray(step, np.float64)
    W = s.warmup
    w = np.minimum(1.0, (x + 1) / W) if W else np.ones_like(x)
    e_w = 2 * U * w if W else 0.0
    floor = lr * s.min_lr_ratio
    if s.name == "constant":
        b = np.full_like(x, lr)
        e_b = U * b
    elif s.name == "rsqrt":
        c = max(W, 1)
        b = lr * np.sqrt(c / np.maximum(x + 1, c))
        e_b = 4 * U * b
    elif s.name == "wsd":
        D = max(int(round(steps * s.decay_frac)), 1)
        p = (lr - floor) * np.clip((x - (steps - D)) / max(D - 1, 1), 0.0, 1.0)
        b = lr - p
        e_b = U * lr + 4 * U * p + U * b
    elif s.name == "cosine":
        t = np.clip((x - W) / max(steps - 1 - W, 1), 0.0, 1.0)
        A, c = (lr - floor) / 2, np.cos(np.pi * t)
        e_q = np.abs(np.sin(np.pi * t)) * 4 * U * np.pi * t + E_COS + U * (1 + c)
        b = floor + A * (1 + c)
        e_b = U * floor + A * (e_q + 2 * U * (1 + c)) + U * b
    else:
        raise ValueError(f"no bound derived for schedule {s.name!r}")
    v = w * b
    return v, b * e_w + w * e_b + U * v
