"""The memory traffic of a compiled XLA program, counted from its HLO text.

The count: in one device's program, the operands and results of the ENTRY computation's
top-level instructions, in bytes, summed. Each top-level kernel reads its operands from and
writes its results to device memory, so this is the step's HBM traffic as the program is
scheduled (caches aside). The rules:
- parameters, tuples, get-tuple-elements, bitcasts and constants move nothing;
- a slice (and dynamic-slice) counts only the part it reads, and so does a fusion's operand
  that its computation only slices (XLA's GPU `wrapped_slice`); dynamic-update-slice, which XLA
  runs in place, counts the update it reads and writes;
- an asynchronous pair (`*-start`, `*-done`) counts once, at its start; where the start's
  result tuple repeats its operands beside the new buffer (copy-start), they count once;
- arrays a TPU places in on-chip memory (a layout's `S(n)`, n > 0) are not device memory and
  count nothing, so a prefetch into vector memory counts its read only.

Kinds: convolutions (convolution, cuDNN calls, fusions around a convolution), matmuls (dot,
cuBLAS calls, fusions around a dot), fusions (the other fusions: elementwise, reductions),
copies and transposes, collectives, and other (sorts, TopK, scatter, ...).
"""

import collections
import dataclasses
import re

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_NAME = re.compile(r"%([\w.\-]+)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}
_COLLECTIVES = {
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "ragged-all-to-all",
    "collective-broadcast",
}
KINDS = ("convolutions", "matmuls", "fusions", "copies and transposes", "collectives", "other")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its name, result type text, opcode, operand names, the text
    between its parentheses and the rest of its line (attributes, metadata)."""

    name: str
    type: str
    opcode: str
    operands: tuple
    args: str
    attrs: str

    @property
    def op_name(self):
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes moved: `total`, `by_kind` {kind: bytes}, `top` [(bytes, kind, name, op_name)] of
    the largest instructions, `count` {kind: instructions}."""

    total: int
    by_kind: dict
    top: list
    count: dict


def type_bytes(type_text, hbm_only=True):
    """Bytes of an HLO type: an array `bf16[2,3]{1,0}`, a tuple of them, or a token (0).

    With `hbm_only`, arrays placed in an on-chip memory space (a TPU layout's `S(n)`, n > 0:
    vector or scalar memory) count 0: they are not device-memory traffic.
    """
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(type_text):
        size = _DTYPE_BYTES.get(dtype)
        if size is None:
            if dtype.startswith("f8"):
                size = 1
            elif dtype == "token":
                continue
            else:
                raise ValueError(f"unknown HLO element type {dtype!r} in {type_text!r}")
        space = _MEMORY_SPACE.search(layout or "")
        if hbm_only and space and int(space.group(1)) != 0:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * size
    return int(total)


def _balanced(text, start):
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced HLO text: {text[start : start + 80]!r}")


def parse_instruction(line):
    """An `Instruction` from one HLO line (`[ROOT] %name = TYPE opcode(operands), attrs`), or
    None for a line that is not one."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":  # a tuple type
        end = _balanced(line, pos)
    else:
        end = line.index(" ", pos)
    type_text = line[pos:end]
    rest = line[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    args_end = _balanced(rest, om.end() - 1)
    args = rest[om.end() : args_end - 1]
    operands = tuple(_NAME.findall(args))
    return Instruction(m.group(1), type_text, om.group(1), operands, args, rest[args_end:])


def computations(hlo_text):
    """{computation name: [Instruction]} of an HLO module's text, and the ENTRY's name."""
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h and not line.startswith(" "):
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _called(ins):
    m = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
    return m.group(1) if m else None


def _custom_target(ins):
    m = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    return m.group(1) if m else ""


def kind_of(ins, comps):
    """The traffic kind (`KINDS`) of a top-level instruction."""
    op = ins.opcode
    base = op.removesuffix("-start")
    if base in _COLLECTIVES:
        return "collectives"
    if op in ("copy", "transpose", "copy-start"):
        return "copies and transposes"
    if op == "convolution":
        return "convolutions"
    if op == "dot":
        return "matmuls"
    if op == "custom-call":
        target = _custom_target(ins).lower()
        if "conv" in target:
            return "convolutions"
        if "gemm" in target or "matmul" in target or "cublas" in target:
            return "matmuls"
        if "cudnn" in target and _inner_ops(ins, comps) & {"convolution"}:
            return "convolutions"
        return "other"
    if op == "fusion":
        inner = _inner_ops(ins, comps)
        if "convolution" in inner or "conv" in _custom_targets(ins, comps):
            return "convolutions"
        if "dot" in inner:
            return "matmuls"
        return "fusions"
    return "other"


def _inner_ops(ins, comps, depth=0):
    """Opcodes inside the computation an instruction calls (fusions nest)."""
    name = _called(ins)
    if name is None or name not in comps or depth > 8:
        return set()
    ops = set()
    for inner in comps[name]:
        ops.add(inner.opcode)
        ops |= _inner_ops(inner, comps, depth + 1)
    return ops


def _custom_targets(ins, comps):
    name = _called(ins)
    return " ".join(_custom_target(i).lower() for i in comps.get(name, ()))


def _tuple_elements(type_text):
    """The top-level element types of a tuple type's text `(a, (b, c), d)`."""
    inner = type_text.strip()[1:-1]
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def _parameter_reads(comp):
    """{parameter index: bytes read} of a fused computation's parameters that are only sliced
    (each slice reads its result's bytes); parameters read whole are absent."""
    index = {ins.name: int(ins.args) for ins in comp if ins.opcode == "parameter"}
    reads, whole = {}, set()
    for ins in comp:
        for pos, name in enumerate(ins.operands):
            if name not in index:
                continue
            if ins.opcode in ("slice", "dynamic-slice") and pos == 0:
                reads[name] = reads.get(name, 0) + type_bytes(ins.type)
            else:
                whole.add(name)
    return {index[n]: b for n, b in reads.items() if n not in whole}


def instruction_bytes(ins, sizes, comps=None):
    """Bytes an ENTRY instruction moves: its operands' and its result's (`sizes`: name ->
    result bytes of every ENTRY instruction), with the slice and async rules of the module; a
    fusion's operand that its computation only slices (`comps`) counts as the slices read."""
    if ins.opcode in _FREE or ins.opcode.endswith("-done"):
        return 0
    out = type_bytes(ins.type)
    if ins.opcode == "slice-start":
        # ((operand), slice, context): reads the slice's part of the operand, and writes it to
        # device memory unless the slice lands on chip.
        part = _tuple_elements(ins.type)[1]
        return type_bytes(part, hbm_only=False) + type_bytes(part)
    if ins.opcode.endswith("-start") and ins.type.startswith("("):
        # An asynchronous start whose result is a tuple repeats its operands in it beside the
        # new buffer and a context (copy-start: dest, src, context): count the operands once.
        operands = sum(sizes.get(o, 0) for o in ins.operands)
        return operands + max(0, out - operands)
    if ins.opcode in ("slice", "dynamic-slice"):
        rest = sum(sizes.get(o, 0) for o in ins.operands[1:])  # dynamic-slice's start indices
        return 2 * out + rest
    if ins.opcode == "dynamic-update-slice":
        update = sizes.get(ins.operands[1], 0) if len(ins.operands) > 1 else 0
        rest = sum(sizes.get(o, 0) for o in ins.operands[2:])
        return 2 * update + rest
    reads = {}
    if ins.opcode == "fusion" and comps is not None and _called(ins) in comps:
        reads = _parameter_reads(comps[_called(ins)])
    total = out
    for i, o in enumerate(ins.operands):
        total += min(reads[i], sizes.get(o, 0)) if i in reads else sizes.get(o, 0)
    return total


def count(hlo_text, top=10):
    """`Traffic` of a compiled module's text (one device's program)."""
    comps, entry = computations(hlo_text)
    body = comps[entry]
    sizes = {ins.name: type_bytes(ins.type) for ins in body}
    by_kind = collections.Counter({k: 0 for k in KINDS})
    n = collections.Counter({k: 0 for k in KINDS})
    rows = []
    for ins in body:
        b = instruction_bytes(ins, sizes, comps)
        if not b:
            continue
        kind = kind_of(ins, comps)
        by_kind[kind] += b
        n[kind] += 1
        rows.append((b, kind, ins.name, ins.op_name))
    rows.sort(key=lambda r: -r[0])
    return Traffic(sum(by_kind.values()), dict(by_kind), rows[:top], dict(n))


def main(argv=None):
    """`python -m jdistill.aot.traffic PROGRAM.hlo [IMAGES_PER_DEVICE]`: the count of a program
    `scripts/aot_compile.py --dump_hlo` wrote, by kind, and its ten largest instructions."""
    import sys  # noqa: PLC0415

    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m jdistill.aot.traffic PROGRAM.hlo [IMAGES_PER_DEVICE]")
        return 2
    images = int(args[1]) if len(args) > 1 else 1
    with open(args[0]) as f:
        t = count(f.read())
    gib = 1024**3
    print(f"{'total':<24} {t.total / images / gib:8.3f} GiB per image ({images} per device)")
    for kind in KINDS:
        n = t.count[kind]
        print(f"{kind:<24} {t.by_kind[kind] / images / gib:8.3f} GiB  ({n} instructions)")
    for b, kind, name, op_name in t.top:
        print(f"{b / gib:8.3f} GiB  {kind:<22} {name}  {op_name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
