"""Which nodes of an ONNX graph an execution provider has kernels for, read from a kernel table.

ONNX Runtime places a node on a provider only when that provider registered a kernel for the node's op and
domain, for the version of the op the model's opset resolves to, and for the types bound to the op's type
parameters; any other node runs on the CPU provider, with copies between devices around it. The table of
the DirectML provider is package data (`data/dml_kernels.tsv`, taken from onnxruntime's
docs/OperatorKernels.md by scripts/update_dml_kernels.py); the kernels of providers built into the installed
onnxruntime are read from it (`installed_table`). Graphs are read with `onnx` only.

Limits: only what the table says is checked (op, domain, version, types). A provider can still refuse a
node for its attributes or shapes at session creation (DirectML: more than 8 dimensions, some attribute
values); nodes inside subgraphs (If/Loop bodies) are not checked.
"""
import re
from dataclasses import dataclass, field
from importlib import resources

import onnx

STANDARD = "ai.onnx"
MAX_VERSION = 2**31 - 1
TABLE_FILES = {"dml": "dml_kernels.tsv"}
# ONNX Runtime turns these into initializers when it loads the graph: no kernel runs them
NO_KERNEL_NEEDED = {(STANDARD, "Constant")}
PROVIDER_NAMES = {"dml": "DmlExecutionProvider", "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class KernelTableError(ValueError):
    """A kernel table that cannot be read or a provider without one."""


@dataclass(frozen=True)
class Kernel:
    """One registered kernel: op versions [start, end] and the types allowed per type parameter."""

    start: int
    end: int
    types: dict


@dataclass(frozen=True)
class Signature:
    """The type parameter (or a fixed type such as "tensor(int64)") of each input and output, in order."""

    inputs: tuple
    outputs: tuple
    variadic_input: bool = False
    since: int | None = None


@dataclass
class KernelTable:
    provider: str
    source: str
    kernels: dict = field(default_factory=dict)     # (domain, op) -> [Kernel]
    signatures: dict = field(default_factory=dict)  # (domain, op) -> Signature, for ops onnx has no schema for


@dataclass(frozen=True)
class Fallback:
    """A node the provider has no kernel for; reason: "op", "opset" or "type" and the details."""

    node: str
    op: str
    domain: str
    reason: str
    detail: str


def type_name(elem_type):
    """onnx TensorProto element type -> onnxruntime's spelling, e.g. tensor(float16)."""
    return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"


# ---------------------------------------------------------------- tables

def load_table(provider):
    """The kernel table shipped for `provider` ("dml")."""
    if provider not in TABLE_FILES:
        raise KernelTableError(f"no kernel table is shipped for provider {provider!r}; shipped: {', '.join(TABLE_FILES)}")
    text = resources.files("sdonnx").joinpath("data", TABLE_FILES[provider]).read_text(encoding="utf-8")
    table = parse_table(text)
    table.provider = table.provider or PROVIDER_NAMES[provider]
    return table


def parse_table(text):
    """Read a table written by scripts/update_dml_kernels.py (comment lines, then domain, op, opset,
    parameters and types columns, tab-separated)."""
    comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    meta = dict(line.split(":", 1) for line in comments if ":" in line)
    table = KernelTable(provider=meta.get("provider", "").strip(), source="; ".join(comments))
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    if not rows or rows[0][:3] != ["domain", "op", "opset"]:
        raise KernelTableError("kernel table without its header row (domain, op, opset, parameters, types)")
    for domain, op, opset, parameters, types in rows[1:]:
        start, end = parse_opset(opset)
        table.kernels.setdefault((domain, op), []).append(Kernel(start, end, parse_types(types)))
        if (domain, op) not in table.signatures and parameters:
            table.signatures[(domain, op)] = parse_parameters(parameters)
    return table


def parse_opset(cell):
    """'13+' -> (13, max), '[6, 12]' -> (6, 12), '11' -> (11, 11)."""
    cell = cell.strip()
    if cell.endswith("+"):
        return int(cell[:-1]), MAX_VERSION
    if cell.startswith("["):
        low, high = (int(v) for v in cell.strip("[]").split(","))
        return low, high
    return int(cell), int(cell)


def parse_types(cell):
    """'**T** = tensor(float), tensor(float16)<br/> **T1** = tensor(int64)' -> {T: {...}, T1: {...}}."""
    types = {}
    for part in re.split(r"<br\s*/?>", cell):
        match = re.match(r"\s*\*\*(\w+)\*\*\s*=\s*(.*)", part)
        if match:
            types[match.group(1)] = frozenset(t.strip() for t in re.findall(r"(?:seq\()?tensor\([\w]+\)\)?", match.group(2)))
    return types


def parse_parameters(cell):
    """'*in* X:**T**<br> *out* Y:**T**' (alternatives joined by 'or') -> the Signature with most inputs."""
    best = None
    for alternative in re.split(r"<br>\s*<br>\s*or\s*<br>\s*<br>", cell):
        inputs = tuple(re.findall(r"\*in\*\s*[\w.]+:\*\*([\w()]+)\*\*", alternative))
        outputs = tuple(re.findall(r"\*out\*\s*[\w.]+:\*\*([\w()]+)\*\*", alternative))
        if best is None or len(inputs) > len(best.inputs):
            best = Signature(inputs, outputs)
    return best


def installed_table(provider):
    """The kernels of `provider` in the installed onnxruntime build (what its sessions will really have)."""
    from onnxruntime.capi import _pybind_state as C

    name = PROVIDER_NAMES.get(provider, provider)
    table = KernelTable(provider=name, source=f"installed onnxruntime {_ort_version()}")
    for kernel in C.get_all_opkernel_def():
        if kernel.provider == name:
            start, end = kernel.version_range
            types = {k: frozenset(v) for k, v in kernel.type_constraints.items()}
            table.kernels.setdefault((kernel.domain or STANDARD, kernel.op_name), []).append(Kernel(start, end, types))
    if not table.kernels:
        raise KernelTableError(f"the installed onnxruntime has no {name} kernels")
    for schema in C.get_all_operator_schema():
        if (schema.domain or STANDARD) != STANDARD:
            table.signatures[(schema.domain, schema.name)] = Signature(
                tuple(i.typeStr for i in schema.inputs), tuple(o.typeStr for o in schema.outputs),
                bool(schema.inputs) and schema.inputs[-1].option == schema.FormalParameterOption.Variadic,
                schema.since_version)
    return table


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


# ---------------------------------------------------------------- graphs

def _domain(node_domain):
    return node_domain if node_domain not in ("", "ai.onnx") else STANDARD


def _opsets(model):
    return {_domain(o.domain): o.version for o in model.opset_import}


def signature(node, opsets, table):
    """The node's Signature: onnx's schema for standard ops, else the table's."""
    domain = _domain(node.domain)
    if domain == STANDARD:
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(STANDARD, 1), "")
        except onnx.defs.SchemaError:
            return None
        variadic = bool(schema.inputs) and schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        return Signature(tuple(i.type_str for i in schema.inputs), tuple(o.type_str for o in schema.outputs),
                         variadic, schema.since_version)
    return table.signatures.get((domain, node.op_type))


def _param_of(params, index, variadic):
    if index < len(params):
        return params[index]
    return params[-1] if variadic and params else None


def _bind(node, sig, types):
    """{type parameter: set of value types} for the node's known input types."""
    bound = {}
    for index, name in enumerate(node.input):
        param = _param_of(sig.inputs, index, sig.variadic_input)
        if name and param and not param.startswith("tensor(") and name in types:
            bound.setdefault(param, set()).add(types[name])
    return bound


def _attribute(node, name):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _output_type(node, param, bound, input_types):
    if param is None:
        return input_types[0] if input_types else None  # contrib op without a signature: its input's type
    if param.startswith("tensor("):
        return param
    if param in bound:
        return sorted(bound[param])[0]
    if node.op_type == "Cast":
        return type_name(_attribute(node, "to"))
    if node.op_type in ("Constant", "ConstantOfShape"):
        value = _attribute(node, "value")
        return type_name(value.data_type) if value is not None else "tensor(float)"
    return None


def value_types(model, table=None):
    """{value name: "tensor(...)"} for the graph's inputs, initializers and every node output whose type
    follows from its inputs (onnx's schemas for standard ops; the table's signatures for contrib ops)."""
    table = table or KernelTable("", "")
    graph, opsets = model.graph, _opsets(model)
    declared = {v.name: type_name(v.type.tensor_type.elem_type)
                for v in list(graph.value_info) + list(graph.output) if v.type.tensor_type.elem_type}
    types = {v.name: type_name(v.type.tensor_type.elem_type) for v in graph.input if v.type.tensor_type.elem_type}
    types.update({i.name: type_name(i.data_type) for i in graph.initializer})
    for node in graph.node:
        sig = signature(node, opsets, table)
        bound = _bind(node, sig, types) if sig else {}
        inputs = [types[n] for n in node.input if n in types]
        for index, name in enumerate(node.output):
            if not name:
                continue
            found = _output_type(node, _param_of(sig.outputs, index, False) if sig else None, bound, inputs)
            if found or name in declared:
                types[name] = found or declared[name]
    return types


def fallbacks(model, table, types=None):
    """Every top-level node of `model` without a kernel in `table`, in graph order."""
    opsets = _opsets(model)
    types = types if types is not None else value_types(model, table)
    found = []
    for node in model.graph.node:
        why = _missing(node, opsets, table, types)
        if why:
            found.append(Fallback(node.name or node.output[0], node.op_type, _domain(node.domain), *why))
    return found


def _missing(node, opsets, table, types):
    domain = _domain(node.domain)
    if (domain, node.op_type) in NO_KERNEL_NEEDED:
        return None
    kernels = table.kernels.get((domain, node.op_type))
    if not kernels:
        return "op", f"no {table.provider or 'provider'} kernel for {domain}.{node.op_type}"
    sig = signature(node, opsets, table)
    since = sig.since if sig and sig.since is not None else opsets.get(domain, 1)
    versioned = [k for k in kernels if k.start <= since <= k.end]
    if not versioned:
        have = ", ".join(_versions(k) for k in kernels)
        return "opset", f"{node.op_type} version {since} (opset {opsets.get(domain)}); kernels for versions {have}"
    bound = _bind(node, sig, types) if sig else {}
    if any(_types_fit(k, bound) for k in versioned):
        return None
    wanted = ", ".join(f"{p}={'/'.join(sorted(v))}" for p, v in sorted(bound.items()))
    allowed = "; ".join(", ".join(f"{p}: {'/'.join(sorted(t))}" for p, t in sorted(k.types.items())) for k in versioned)
    return "type", f"{node.op_type} with {wanted}; kernels take {allowed}"


def _types_fit(kernel, bound):
    return all(param not in kernel.types or values <= kernel.types[param] for param, values in bound.items())


def _versions(kernel):
    if kernel.end == MAX_VERSION:
        return f"{kernel.start}+"
    return str(kernel.start) if kernel.start == kernel.end else f"{kernel.start}-{kernel.end}"


# ---------------------------------------------------------------- models

@dataclass(frozen=True)
class GraphReport:
    """One graph's check: its path (relative to the model folder), node count and fallbacks."""

    graph: str
    nodes: int
    fallbacks: list


def table_for(provider):
    """The shipped table for `provider` when there is one (dml), else the installed onnxruntime's kernels."""
    if provider in TABLE_FILES:
        return load_table(provider)
    if provider not in PROVIDER_NAMES:
        raise KernelTableError(f"provider {provider!r}: choose one of {', '.join(sorted(set(TABLE_FILES) | set(PROVIDER_NAMES)))}")
    return installed_table(provider)


def check_graph(path, table, label=None):
    """GraphReport of the ONNX file at `path` (weights are not read)."""
    model = onnx.load(str(path), load_external_data=False)
    return GraphReport(label or str(path), len(model.graph.node), fallbacks(model, table))


def check_model(path, provider):
    """GraphReports of a converted model folder (every component's base and derived graph) or one .onnx file."""
    from pathlib import Path

    from .manifest import load_manifest

    table, path = table_for(provider), Path(path)
    if path.is_file():
        return [check_graph(path, table, path.name)]
    manifest = load_manifest(path)
    graphs = [p for c in manifest.components.values() for p in (c.path, c.optimized_path) if p]
    return [check_graph(path / graph, table, graph) for graph in graphs]
