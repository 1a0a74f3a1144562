"""`_backend.gradients_at`: the gradients at values computed inside one pass, on every backend.

TensorFlow's tape and PyTorch's autograd differentiate at any tensor of the
pass; JAX differentiates with respect to a zero perturbation added at each
`gradient_point`. The layer rows rest on this, so it is checked here against
the derivatives written out by hand in NumPy.
"""

import numpy as np
import pytest
from helpers import to_numpy
from keras import ops

from keras_noisygd import _backend

pytestmark = pytest.mark.all_backends

# float32 throughout: a handful of products and one tanh, relative rounding ~1e-7 of O(1) values.
TOL = dict(rtol=1e-5, atol=1e-6)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(3, 2)).astype("float32"), rng.normal(size=(4, 2)).astype("float32")


@pytest.mark.parametrize("regularized", [True, False])
def test_gradients_at_points_inside_the_pass_are_the_hand_derivatives(regularized):
    a, w_value, c = _problem()
    w = _backend.leaf(ops.convert_to_tensor(w_value))
    a_t, c_t = ops.convert_to_tensor(a), ops.convert_to_tensor(c)

    def forward():
        used = _backend.gradient_point(w)  # every use of a trainable value goes through its point (JAX)
        z = _backend.gradient_point(ops.matmul(a_t, used))
        out = _backend.gradient_point(ops.tanh(z))
        total = ops.sum(out**2 * c_t)
        regularization = ops.sum(used**2) * 0.5 if regularized else None
        return total, regularization, [z, out, w], {"out": out, "again": out, "z": z}

    (g_z, g_out, g_w), reg_grads, kept = _backend.gradients_at(forward, [w])
    out = np.tanh(a @ w_value)
    expected_out = 2 * out * c                   # d total / d out
    expected_z = expected_out * (1 - out**2)     # through tanh
    np.testing.assert_allclose(to_numpy(g_out), expected_out, **TOL)
    np.testing.assert_allclose(to_numpy(g_z), expected_z, **TOL)
    np.testing.assert_allclose(to_numpy(g_w), a.T @ expected_z, **TOL)
    if regularized:
        np.testing.assert_allclose(to_numpy(reg_grads[0]), w_value, **TOL)   # d (|w|^2 / 2) / dw
    else:
        assert reg_grads is None
    # What the pass kept comes out with its values, one array per array (the rules compare by identity).
    np.testing.assert_allclose(to_numpy(kept["out"]), out, **TOL)
    assert kept["again"] is kept["out"] and kept["z"] is not kept["out"]


def test_a_gradient_point_outside_a_pass_is_the_value_itself():
    value = ops.convert_to_tensor(np.ones((2, 2), "float32"))
    assert _backend.gradient_point(value) is value
