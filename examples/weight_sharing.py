"""Weight sharing: the gradient of a shared weight is the sum of its gradients wherever it is used.

A convolution uses every kernel weight at every output position (of every image). Give each position
its own copy of the kernel - a *locally connected* layer, the same function while the copies are equal -
and each copy gets its own gradient; the convolution's gradient is their sum. This example checks that
identity on gpucnn's Conv2D backward, and both against finite differences.

The lecture's two-use example: with w1 = w2 = w, dl/dw = dl/dw1 + dl/dw2, one term per path through the
graph (the multivariable chain rule). Its update w1 := w2 := w1 - eta * 1/2 (dl/dw1 + dl/dw2) averages the
two; gpucnn's backward (like PyTorch's) gives the plain sum, and averaging would only rescale eta.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import gpucnn
from gpucnn import layers as L
from gpucnn.testing import check_backward


def locally_connected(x, w_local):
    """y[n, o, i, j] = sum_{c, kh, kw} w_local[i, j, o, c, kh, kw] * x[n, c, i + kh, j + kw] (stride 1, no
    padding, no bias): a convolution whose kernel may differ at every output position (i, j)."""
    K = w_local.shape[-1]
    patches = sliding_window_view(x, (K, K), axis=(2, 3))            # (N, C, OH, OW, K, K)
    return np.einsum("ncijab,ijocab->noij", patches, w_local)


def locally_connected_weight_grad(x, gy, K):
    """dL/dw_local for dL/dy = gy: position (i, j)'s copy sees only the patch at (i, j)."""
    patches = sliding_window_view(x, (K, K), axis=(2, 3))
    return np.einsum("noij,ncijab->ijocab", gy, patches)


def finite_differences(f, w, eps=1e-6):
    """Central differences of the scalar f() for every entry of the float64 array w (changed in place)."""
    g = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        old = w[idx]
        w[idx] = old + eps
        up = f()
        w[idx] = old - eps
        down = f()
        w[idx] = old
        g[idx] = (up - down) / (2 * eps)
    return g


def main():
    args = _common.setup("weight_sharing", __doc__)
    rng = np.random.default_rng(0)
    N, C, O, H, K = 2, 2, 3, 6, 3
    OH = H - K + 1

    print(f"\n1. A Conv2D({C}, {O}, {K}) on {N} images of {C}x{H}x{H}: each weight is used at {N} images x "
          f"{OH}x{OH} positions = {N * OH * OH} places")
    conv = L.Conv2D(C, O, K, bias=False, dtype="float64", rng=rng)
    x = rng.standard_normal((N, C, H, H))
    gy = rng.standard_normal((N, O, OH, OH))                   # dL/dy of the scalar L = sum(y * gy)
    y = gpucnn.to_numpy(conv.forward(gpucnn.asarray(x), training=True))
    conv.backward(gpucnn.asarray(gy))
    g_conv = gpucnn.to_numpy(conv.grads["weight"])

    w = gpucnn.to_numpy(conv.params["weight"]).copy()
    w_local = np.broadcast_to(w, (OH, OH) + w.shape).copy()     # one copy of the kernel per position
    y_local = locally_connected(x, w_local)
    print(f"locally connected layer with equal copies computes the same y: max |difference| "
          f"{np.abs(y_local - y).max():.1e}")
    g_local = locally_connected_weight_grad(x, gy, K)          # (OH, OW, O, C, K, K)
    g_sum = g_local.sum(axis=(0, 1))
    wf = w.copy()
    g_fd = finite_differences(lambda: float((conv_numpy(x, wf) * gy).sum()), wf)
    d_sum, d_fd = np.abs(g_conv - g_sum).max(), np.abs(g_conv - g_fd).max()
    scale = np.abs(g_conv).max()
    print(f"weight-sharing identity: max |conv gradient - sum over positions of the locally connected gradients| "
          f"= {d_sum:.1e} (gradients up to {scale:.2f})")
    print(f"finite differences: max |conv gradient - finite differences| = {d_fd:.1e}")
    report = check_backward(conv, gpucnn.asarray(x))
    print(f"gpucnn.testing.check_backward(Conv2D): worst relative error {report['weight']['max_rel_error']:.1e} "
          f"for the weight, {report['x']['max_rel_error']:.1e} for the input")
    probe = (0, 0, 1, 1)
    print(f"for example w{list(probe)}: gradient {g_conv[probe]:.6f} = the sum of its gradients at the {OH * OH} "
          f"positions (each summed over the {N} images) {g_sum[probe]:.6f} (finite differences {g_fd[probe]:.6f})")

    print("\n2. The lecture's two-use example: one weight w used twice, w1 = w2 = w")
    two = two_paths(x1=1.5, x2=-0.8, w=0.6, target=1.0)
    print("a1 = sigmoid(w1 x1), a2 = sigmoid(w2 x2), o = a1 * a2, l = (o - t)^2 / 2 with x1 = 1.5, x2 = -0.8, "
          "w = 0.6, t = 1")
    print(f"upper path  dl/do * do/da1 * da1/dw1 = {two['upper']:+.6f}")
    print(f"lower path  dl/do * do/da2 * da2/dw2 = {two['lower']:+.6f}")
    print(f"sum of both paths                    = {two['upper'] + two['lower']:+.6f}")
    print(f"gpucnn Conv2D(1, 1, 1) gradient      = {two['conv']:+.6f} (one 1x1 kernel used at two pixels)")
    print(f"finite difference of l(w)            = {two['fd']:+.6f}")
    eta = 0.5
    plain = two["w"] - eta * (two["upper"] + two["lower"])
    averaged = two["w"] - eta * 0.5 * (two["upper"] + two["lower"])
    print(f"update with eta = {eta}: plain sum (gpucnn, PyTorch) w := {plain:.6f}; "
          f"with the optional averaging w1 := w2 := w1 - eta * 1/2 (dl/dw1 + dl/dw2) = {averaged:.6f} "
          f"(the same as the plain sum with eta / 2)")

    fig = picture(g_local, g_conv, g_sum, g_fd, probe, two, eta)
    fig.savefig(args.out / "weight_sharing.png", dpi=110)
    _common.saved(args.out / "weight_sharing.png")


def conv_numpy(x, w):
    """A reference convolution (cross-correlation, stride 1, no padding) in float64 for the finite differences."""
    K = w.shape[-1]
    return np.einsum("ncijab,ocab->noij", sliding_window_view(x, (K, K), axis=(2, 3)), w)


def two_paths(x1, x2, w, target):
    """The chain rule's two terms for a weight used twice, and the same gradient from gpucnn and finite differences."""
    sig = lambda z: 1 / (1 + np.exp(-z))

    def loss(w1, w2):
        o = sig(w1 * x1) * sig(w2 * x2)
        return 0.5 * (o - target) ** 2

    a1, a2 = sig(w * x1), sig(w * x2)
    dl_do = a1 * a2 - target
    upper = dl_do * a2 * a1 * (1 - a1) * x1          # do/da1 = a2, da1/dw1 = a1 (1 - a1) x1
    lower = dl_do * a1 * a2 * (1 - a2) * x2
    eps = 1e-6
    fd = (loss(w + eps, w + eps) - loss(w - eps, w - eps)) / (2 * eps)

    # the same graph in gpucnn: a 1x1 conv on the 1x2 "image" [x1, x2] uses its one weight at both pixels
    conv = L.Conv2D(1, 1, 1, bias=False, dtype="float64")
    conv.params["weight"][...] = w
    act = L.Sigmoid()
    a = gpucnn.to_numpy(act.forward(conv.forward(gpucnn.asarray(np.array([[[[x1, x2]]]])), training=True)))
    a1_, a2_ = a[0, 0, 0]
    dl_da = np.array([[[[(a1_ * a2_ - target) * a2_, (a1_ * a2_ - target) * a1_]]]])
    conv.backward(act.backward(gpucnn.asarray(dl_da)))
    g = float(gpucnn.to_numpy(conv.grads["weight"]).reshape(()))
    return {"upper": upper, "lower": lower, "fd": fd, "conv": g, "w": w}


def picture(g_local, g_conv, g_sum, g_fd, probe, two, eta):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])

    # (1) the probe weight's gradient at every position
    o, c, kh, kw = probe
    per_pos = g_local[:, :, o, c, kh, kw]
    v = np.abs(per_pos).max()
    im = a1.imshow(per_pos, cmap="RdBu_r", vmin=-v, vmax=v)
    for (i, j), val in np.ndenumerate(per_pos):
        a1.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(val) > v / 2 else "black")
    a1.set_xticks(range(per_pos.shape[1]))
    a1.set_yticks(range(per_pos.shape[0]))
    a1.set_xlabel("output column")
    a1.set_ylabel("output row")
    fig.colorbar(im, ax=a1, shrink=0.8)
    a1.set_title(f"gradient of weight {list(probe)} at each position\n(locally connected copies); "
                 f"sum {per_pos.sum():.3f} = conv gradient {g_conv[probe]:.3f}", fontsize=10)

    # (2) every weight: conv gradient against the two references
    lim = 1.1 * np.abs(g_conv).max()
    a2.plot([-lim, lim], [-lim, lim], color="0.7", lw=1, zorder=0)
    a2.scatter(g_conv.ravel(), g_sum.ravel(), s=40, facecolors="none", edgecolors="tab:blue",
               label="sum over positions of the\nlocally connected gradients")
    a2.scatter(g_conv.ravel(), g_fd.ravel(), s=14, marker="x", color="tab:red", label="finite differences")
    a2.set_xlim(-lim, lim)
    a2.set_ylim(-lim, lim)
    a2.set_aspect("equal")
    a2.set_xlabel("gpucnn Conv2D backward: dL/dw")
    a2.set_ylabel("reference")
    a2.legend(fontsize=8, loc="upper left")
    a2.set_title(f"all {g_conv.size} kernel weights: every point on the diagonal", fontsize=10)

    # (3) the lecture's two paths, and the two updates
    names = ["upper path\n(via a1)", "lower path\n(via a2)", "sum", "gpucnn\nConv2D", "finite\ndifference"]
    vals = [two["upper"], two["lower"], two["upper"] + two["lower"], two["conv"], two["fd"]]
    bars = a3.bar(names, vals, color=["tab:orange", "tab:purple", "tab:blue", "tab:blue", "tab:gray"])
    for b, val in zip(bars, vals):
        a3.text(b.get_x() + b.get_width() / 2, val, f"{val:+.4f}", ha="center",
                va="bottom" if val >= 0 else "top", fontsize=8)
    a3.axhline(0, color="black", lw=0.8)
    a3.set_ylabel("dl/dw")
    a3.tick_params(axis="x", labelsize=8)
    s = two["upper"] + two["lower"]
    a3.set_title(f"one weight used twice (w1 = w2 = {two['w']}): the chain rule sums both paths\n"
                 f"update, eta = {eta}: plain sum w := {two['w'] - eta * s:.4f}, "
                 f"averaged w := {two['w'] - eta * s / 2:.4f}", fontsize=10)
    lo, hi = min(vals + [0]), max(vals + [0])
    a3.set_ylim(lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo))
    return fig


if __name__ == "__main__":
    main()
