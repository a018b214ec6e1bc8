"""The CPU's convolution lowering (gpucnn.kernels.mec, the "gemm" algorithm's CPU twin): its rows against
im2col's receptive fields, its sliced GEMMs and row groups against the definition, and the weight gradient summed
into a flat buffer's view."""
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from gpucnn.kernels import conv as K
from gpucnn.kernels import mec
from conftest import assert_close
from conv_helpers import reference_conv, reference_conv_backward


@given(N=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7), KH=st.integers(1, 4),
       KW=st.integers(1, 4), SH=st.integers(1, 3), SW=st.integers(1, 3), PH=st.integers(0, 2), PW=st.integers(0, 2),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=60, deadline=None)
def test_cpu_row_lowering_holds_every_receptive_field_of_im2col(N, C, H, W, KH, KW, SH, SW, PH, PW, seed):
    # the CPU's lighter lowering (MEC) must present, for output row oh, exactly im2col's columns of that row,
    # with its rows in (kh, c, kw) order instead of (c, kh, kw)
    assume(H + 2 * PH >= KH and W + 2 * PW >= KW)
    x = np.random.default_rng(seed).standard_normal((N, C, H, W))
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    blocks = mec.row_blocks(mec.lower(x, KH, KW, SH, SW, PH, PW), KH, SH, OH)     # (OH, KH*C*KW, OW*N)
    col = K.im2col(x, KH, KW, (SH, SW), (PH, PW)).reshape(C, KH, KW, OH, OW * N)
    expect = col.transpose(3, 1, 0, 2, 4).reshape(OH, KH * C * KW, OW * N)
    np.testing.assert_array_equal(blocks, expect)


@given(N=st.integers(1, 3), C=st.integers(1, 3), Cout=st.integers(1, 3), H=st.integers(1, 8),
       W=st.integers(1, 8), KH=st.integers(1, 4), KW=st.integers(1, 4), SH=st.integers(1, 3), SW=st.integers(1, 3),
       PH=st.integers(0, 2), PW=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
@settings(max_examples=60, deadline=None)
def test_cpu_sliced_gemms_and_row_groups_match_the_definition(N, C, Cout, H, W, KH, KW, SH, SW, PH, PW, seed):
    # The CPU cuts thin GEMMs into column slices and sums grad-weight's per-row products a few rows at a time
    # (SMALL_GEMM, MIN_SLICE, PARTS sized for LeNet and AlexNet at full batch). Shrunk here so that the tiny
    # shapes take those paths: slices of 1-3 columns, ragged last slices, groups of 1-2 rows.
    assume(H + 2 * PH >= KH and W + 2 * PW >= KW)
    old = mec.SMALL_GEMM, mec.MIN_SLICE, mec.PARTS
    mec.SMALL_GEMM, mec.MIN_SLICE, mec.PARTS = 2 * C * KH * KW * Cout, 1, 2 * C * KH * KW * Cout
    try:
        r = np.random.default_rng(seed)
        x, w = r.standard_normal((N, C, H, W)), r.standard_normal((Cout, C, KH, KW))
        y, col = K.conv2d_forward(x, w, None, (SH, SW), (PH, PW))
        gy = r.standard_normal(y.shape)
        gx, gw, _ = K.conv2d_backward(x.shape, col, w, gy, (SH, SW), (PH, PW))
    finally:
        mec.SMALL_GEMM, mec.MIN_SLICE, mec.PARTS = old
    assert_close(y, reference_conv(x, w, None, (SH, SW), (PH, PW)), "float64", "y")
    rgx, rgw, _ = reference_conv_backward(x, w, gy, (SH, SW), (PH, PW))
    assert_close(gx, rgx, "float64", "gx")
    assert_close(gw, rgw, "float64", "gw")


@pytest.mark.parametrize("Cout,N", [(1, 8), (4, 1), (7, 3)])
def test_cpu_weight_gradient_into_a_flat_buffer_view(Cout, N, rng):
    # gw is summed over output rows straight into the optimizer's flat buffer (a view), as train_step does
    x = rng.standard_normal((N, 2, 6, 5))
    w = rng.standard_normal((Cout, 2, 3, 3))
    _, col = K.conv2d_forward(x, w, None, (2, 1), 1)
    gy = rng.standard_normal((N, Cout, 3, 5))
    flat = np.full(w.size + 3, np.nan)
    gz, _ = K.activation_bias_backward(gy, None, "identity", layout="gemm", need_gb=False)
    _, gw = K.conv2d_gemm_backward(x.shape, col, w, gz, (2, 1), 1, need_gx=False, gw_out=flat[2:2 + w.size].reshape(w.shape))
    assert_close(gw, reference_conv_backward(x, w, gy, (2, 1), (1, 1))[1], "float64", "gw")
    assert np.shares_memory(gw, flat) and np.isnan(flat[:2]).all() and np.isnan(flat[-1])
