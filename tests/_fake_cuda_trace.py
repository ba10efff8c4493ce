"""Run in a subprocess without TRITON_INTERPRET (see test_compile_trace.py).

Compiles capstriton functions and modules with ``torch.compile(fullgraph=True)`` on fake CUDA
tensors, which a CPU-only torch can create, with an AOT backend that records the forward graph and
stops before anything is executed. Prints one JSON line per case: the number of graphs and the
call targets in them.
"""

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("TRITON_INTERPRET must not be set: under the interpreter wrap_triton returns the plain kernel")

import torch  # noqa: E402
import triton  # noqa: E402
from torch._functorch.aot_autograd import aot_module_simplified  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import capstriton as ct  # noqa: E402


class TargetOnlyDriver:
    """Stands in for Triton's CUDA driver, which a CPU-only machine lacks: inductor's mutation
    analysis of a user kernel (which arguments the kernel writes, so which must be cloned) only
    compiles it to TTIR and asks the driver for the target. Without it the analysis gives up and
    assumes every argument is written, and the check below would say nothing."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda")


triton.runtime.driver.set_active(TargetOnlyDriver())


class CapturedGraph(Exception):
    """Raised by the forward compiler once the graph is recorded: nothing gets to run."""


def capture(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        def forward_compiler(graph_module, inputs):
            graphs.append(graph_module)
            raise CapturedGraph

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler)

    torch._dynamo.reset()
    try:
        torch.compile(fn, fullgraph=True, backend=backend)(*args)
    except Exception as exc:  # dynamo wraps what the backend raises
        cause = exc
        while cause is not None and not isinstance(cause, CapturedGraph):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
    nodes = [n for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    # A kernel argument the analysis thinks is written is cloned first; a graph input among them
    # is a kernel "mutating" its input (torch 2.11 flagged u_hat so, seen on an H200), which costs
    # a copy of u_hat and breaks torch.compile with a leaf input that requires grad.
    # (Indexed, not .get: a renamed key must fail here, not pass with nothing to check.)
    inputs_written = [
        name
        for n in nodes
        if "triton_kernel_wrapper_functional" in str(n.target)
        for name in n.kwargs["tensors_to_clone"]
        if getattr(n.kwargs["kwargs"].get(name), "op", None) == "placeholder"
    ]
    return {"graphs": len(graphs), "targets": [str(n.target) for n in nodes], "inputs_written": inputs_written}


def main():
    results = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        # Fake CUDA tensors cannot carry autograd state on a CPU-only build (no device guard), so
        # these are inference graphs; the backward ops are checked on a GPU (tests marked cuda).
        u_hat = torch.empty(4, 1152, 10, 16, device="cuda")
        results["dynamic_routing"] = capture(lambda u: ct.dynamic_routing(u, 3, backend="auto"), u_hat)

        layer = ct.nn.RoutingCapsules(37, 8, 10, 16, backend="auto")
        params = {k: torch.empty(p.shape, device="cuda") for k, p in layer.named_parameters()}
        u = torch.empty(4, 37, 8, device="cuda")
        results["RoutingCapsules"] = capture(lambda p, x: torch.func.functional_call(layer, p, (x,)), params, u)
        # bfloat16 with 16D output capsules: the forward's later iterations in one pass each (the
        # coupled sums, whose packed half arithmetic must not make the analysis take u and W as written)
        layer16 = ct.nn.RoutingCapsules(37, 8, 10, 16, backend="auto")  # bfloat16 parameters below
        params16 = {k: torch.empty(p.shape, dtype=torch.bfloat16, device="cuda") for k, p in layer16.named_parameters()}
        u16 = torch.empty(4, 37, 8, dtype=torch.bfloat16, device="cuda")
        results["RoutingCapsules-bfloat16"] = capture(
            lambda p, x: torch.func.functional_call(layer16, p, (x,)), params16, u16
        )

        model = ct.models.CapsNet(backend="auto")
        params = {k: torch.empty(p.shape, device="cuda") for k, p in model.named_parameters()}
        x = torch.empty(2, 1, 28, 28, device="cuda")
        results["CapsNet"] = capture(lambda p, x: torch.func.functional_call(model, p, (x,)), params, x)

        bias = torch.empty(1152, 10, device="cuda")
        results["self_attention_routing"] = capture(
            lambda u, b: ct.self_attention_routing(u, b, backend="auto"), u_hat, bias
        )
        layer = ct.nn.SelfAttentionCapsules(37, 8, 10, 16, backend="auto")
        params = {k: torch.empty(p.shape, device="cuda") for k, p in layer.named_parameters()}
        results["SelfAttentionCapsules"] = capture(lambda p, x: torch.func.functional_call(layer, p, (x,)), params, u)

        model = ct.models.EfficientCapsNet(backend="auto").eval()
        params = {k: torch.empty(p.shape, device="cuda") for k, p in model.named_parameters()}
        buffers = {k: torch.empty(b.shape, dtype=b.dtype, device="cuda") for k, b in model.named_buffers()}
        results["EfficientCapsNet"] = capture(
            lambda p, x: torch.func.functional_call(model, {**p, **buffers}, (x,)), params, x
        )
    for name, result in results.items():
        print(json.dumps({"case": name, **result}))


if __name__ == "__main__":
    main()
