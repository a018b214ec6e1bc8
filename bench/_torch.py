"""bench/train.py's other side: the same network built in PyTorch with gpucnn's weights, PyTorch's eager and
CUDA-graphed training steps and its kernel count; and how each side's peak memory is measured."""
import time
import tracemalloc

import numpy as np

import gpucnn
from gpucnn import backend


def to_torch(model, torch, device):
    """The same network as a torch.nn.Sequential with gpucnn's current weights copied in, one module per
    gpucnn layer (so layer i's parameters are module i's)."""
    nn = torch.nn
    dtype = getattr(torch, model.dtype.name)      # float32 or float64, as the gpucnn net
    mods = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          bias=layer.bias)
        elif kind == "Dense":
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias)
        elif kind == "ReLU":
            m = nn.ReLU(inplace=True)                    # as torchvision's AlexNet
        elif kind == "Tanh":
            m = nn.Tanh()
        elif kind == "MaxPool2D":
            m = nn.MaxPool2d(layer.kernel, layer.stride, layer.padding)
        elif kind == "AvgPool2D":
            m = nn.AvgPool2d(layer.kernel, layer.stride, layer.padding)   # count_include_pad, as gpucnn
        elif kind == "LocalResponseNorm":
            # PyTorch divides alpha by size (the mean of squares); gpucnn's alpha multiplies the sum
            m = nn.LocalResponseNorm(layer.size, alpha=layer.alpha * layer.size, beta=layer.beta, k=layer.k)
        elif kind == "Dropout":
            m = nn.Dropout(layer.p)
        elif kind == "Flatten":
            m = nn.Flatten()
        else:
            raise NotImplementedError(f"bench/train.py: no PyTorch twin written for gpucnn's {kind}")
        m = m.to(dtype)
        with torch.no_grad():
            for name, p in layer.params.items():
                getattr(m, name).copy_(torch.from_numpy(backend.to_numpy(p)))
        mods.append(m)
    return nn.Sequential(*mods).to(device)


def torch_step(torch, tmodel, topt, x, y):
    topt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(tmodel(x), y)
    loss.backward()
    topt.step()
    return loss


def torch_graphed_step(torch, tmodel, topt, x, y):
    """The whole step captured once in a CUDA graph (PyTorch's recipe for whole-network capture: warm up on
    a side stream, grads set to None so backward allocates them from the graph's pool); returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            torch_step(torch, tmodel, topt, x, y)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    topt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.cross_entropy(tmodel(x), y)
        loss.backward()
        topt.step()
    return graph.replay


def torch_kernels_per_step(torch, step):
    """CUDA kernels (and copies, memsets) one step runs, by PyTorch's profiler; None where it cannot say."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:     # the profiler is an extra here: its failure must not stop the benchmark
        print(f"  (PyTorch's profiler could not count kernels: {type(e).__name__}: {e})")
        return None


def torch_epoch(torch, ds, batch, lr, momentum, weight_decay):
    """The same epoch written the way a PyTorch user would: standardise the set once, then for each
    shuffled batch forward, cross-entropy, backward, SGD step, and the loss read back."""
    tmodel = to_torch(gpucnn.models.lenet5(seed=0), torch, "cpu")     # the same initial weights
    topt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    F = torch.nn.functional
    t0 = time.perf_counter()
    images = torch.from_numpy(ds.images).float()
    mean, std = images.mean(), images.std(correction=0)
    images = (images - mean) / std
    labels = torch.from_numpy(np.asarray(ds.labels, np.int64))
    n = len(ds)
    order = torch.from_numpy(np.random.default_rng([0, 0]).permutation(n))
    total, correct = 0.0, 0
    for start in range(0, n, batch):
        idx = order[start:start + batch]
        xb, yb = images[idx], labels[idx]
        topt.zero_grad(set_to_none=True)
        out = tmodel(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        topt.step()
        total += loss.item() * len(idx)
        correct += int((out.argmax(1) == yb).sum())
    return time.perf_counter() - t0, total / n, correct / n


def cupy_peak_bytes(fn):
    """Device memory in use at the peak of fn(), through CuPy's pool: what was in use before plus the
    highest running total of blocks taken minus blocks given back (a CuPy memory hook), as
    torch.cuda.max_memory_allocated counts for PyTorch."""
    import cupy
    from cupy.cuda import memory_hook

    class Peak(memory_hook.MemoryHook):
        name = "bench-peak"

        def __init__(self):
            self.live = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.live += kw["mem_size"]
            self.peak = max(self.peak, self.live)

        def free_postprocess(self, **kw):
            self.live -= kw["mem_size"]

    cupy.cuda.Device().synchronize()
    base = cupy.get_default_memory_pool().used_bytes()
    hook = Peak()
    with hook:
        fn()
        cupy.cuda.Device().synchronize()
    return base + hook.peak


def numpy_step_peak_bytes(fn):
    """The most NumPy memory held at once by what fn() allocates (tracemalloc sees NumPy's buffers), not
    counting what existed before (weights, gradients, optimizer state)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
