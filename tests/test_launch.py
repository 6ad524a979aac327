"""numbattn/launch.py: a prepared Launch does what kernel[grid, block](*args) does; CUDA graphs replay launches
(GPU only) and see values that change in device memory between replays."""
import numpy as np
import pytest
from numba import cuda

from numbattn.kernels.common import SIM
from numbattn.launch import Graph, Launch


@cuda.jit
def axpy(a, x, y):
    """y = a * x + y"""
    i = cuda.grid(1)
    if i < x.shape[0]:
        y[i] = a * x[i] + y[i]


@cuda.jit
def scale_by_first(s, y):
    """y *= s[0]: a value read from device memory at run time, not frozen as an argument"""
    i = cuda.grid(1)
    if i < y.shape[0]:
        y[i] *= s[0]


def test_launch_equals_a_normal_launch_and_arguments_can_change():
    x = np.arange(10, dtype=np.float32)
    y1, y2 = cuda.to_device(np.ones(10, np.float32)), cuda.to_device(np.ones(10, np.float32))
    axpy[1, 16](np.float32(2.0), cuda.to_device(x), y1)
    step = Launch(axpy, 1, 16, (np.float32(2.0), cuda.to_device(x), y2))
    step()
    np.testing.assert_array_equal(y1.copy_to_host(), y2.copy_to_host())
    other = cuda.to_device(np.zeros(10, np.float32))
    step.set_arg(2, other)
    step(grid=(1, 1, 1))
    np.testing.assert_array_equal(other.copy_to_host(), 2 * x)
    if not SIM:                                          # the simulator types nothing: any array would run
        with pytest.raises(ValueError, match="does not match the prepared type"):
            step.set_arg(2, cuda.to_device(np.zeros((2, 5), np.float32)))


@pytest.mark.gpu
def test_graph_replays_the_captured_launches():
    stream = cuda.stream()
    x = cuda.to_device(np.arange(8, dtype=np.float32), stream=stream)
    y = cuda.to_device(np.zeros(8, np.float32), stream=stream)
    s = cuda.to_device(np.array([1.0], np.float32), stream=stream)
    add = Launch(axpy, 1, 32, (np.float32(1.0), x, y), stream)
    mul = Launch(scale_by_first, 1, 32, (s, y), stream)
    graph = Graph(stream)
    with graph.capture():
        add()
        mul()
    stream.synchronize()
    assert (y.copy_to_host() == 0).all()                 # captured, not run
    graph.replay()
    s.copy_to_device(np.array([3.0], np.float32), stream=stream)
    graph.replay()                                       # (0 + x) * 1 = x, then (x + x) * 3
    stream.synchronize()
    np.testing.assert_array_equal(y.copy_to_host(), 6 * np.arange(8))
    with pytest.raises(ValueError, match="stream of its own"):
        Graph(cuda.default_stream())
