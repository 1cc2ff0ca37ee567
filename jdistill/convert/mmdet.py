"""mmdetection 2.x state_dicts <-> jdistill Flax variables (`specs/detectors.md` §9).

One key table per module family, expressed as rewrite rules on the Flax path:

  ResNet   backbone/layer1_0/conv1/conv/kernel  <-> backbone.layer1.0.conv1.weight
           backbone/layer1_0/downsample_conv    <-> backbone.layer1.0.downsample.0
           BN scale/bias + batch_stats mean/var <-> weight/bias/running_mean/running_var
  FPN      neck/lateral_convs_0/conv/kernel     <-> neck.lateral_convs.0.conv.weight
  heads    bbox_head/cls_convs_0/conv|gn        <-> bbox_head.cls_convs.0.conv|gn (ConvModule)
           bbox_head/retina_cls/conv/kernel     <-> bbox_head.retina_cls.weight (plain Conv2d)
           bbox_head/scales_2                   <-> bbox_head.scales.2.scale
  Faster   rpn_head/rpn_conv/conv/kernel        <-> rpn_head.rpn_conv.weight
  R-CNN    bbox_head/shared_fcs_0/kernel        <-> roi_head.bbox_head.shared_fcs.0.weight, its
           input reordered from torch's (C, H, W) flatten to our channels-last (H, W, C)

Layouts: conv kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in). Buffers the Flax
model does not hold (`num_batches_tracked`, GFL's `integral.project`) are checked on import and
written on export. Loading is strict: every missing key, unexpected key and shape mismatch is
listed in one error. Reading never unpickles arbitrary objects: a `.pth` whose pickle would
import anything but tensors and plain containers is refused by name, and the load itself is
`torch.load(weights_only=True)`.
"""

import _compat_pickle
import collections
import copyreg
import io
import os
import pickle
import pickletools
import re
import zipfile

import numpy as np

from jdistill import checkpoint

# Flax module names whose children are mmcv ConvModules (they keep the inner `.conv.`).
CONV_MODULES = ("lateral_convs", "fpn_convs", "cls_convs", "reg_convs")
CONV_MODULE_RE = re.compile(r"^({})_(\d+)$".format("|".join(CONV_MODULES)))
NORM_NAMES = re.compile(r"^(bn\d*|downsample_bn|gn)$")
# Legacy FCOS head names, renamed on load as mmdetection's anchor_free_head does.
LEGACY_RENAMES = {
    "bbox_head.fcos_cls.": "bbox_head.conv_cls.",
    "bbox_head.fcos_reg.": "bbox_head.conv_reg.",
    "bbox_head.fcos_centerness.": "bbox_head.conv_centerness.",
}
# Faster R-CNN's RoI head lives under `roi_head.` in mmdetection.
ROI_HEAD_CHILDREN = re.compile(r"^(shared_fcs_\d+|fc_cls|fc_reg)$")
CLASSIFIERS = (
    "roi_head.bbox_head.fc_cls.weight",
    "bbox_head.retina_cls.weight",
    "bbox_head.gfl_cls.weight",
    "bbox_head.conv_cls.weight",
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists every problem."""


def _module_name(part):
    m = re.match(r"^(layer\d+)_(\d+)$", part)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if part == "downsample_conv":
        return "downsample.0"
    if part == "downsample_bn":
        return "downsample.1"
    m = CONV_MODULE_RE.match(part) or re.match(r"^(shared_fcs)_(\d+)$", part)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return part


def torch_key(collection, path):
    """The mmdetection key of one Flax leaf.

    Args:
      collection: 'params' or 'batch_stats'.
      path: tuple of names, e.g. ('backbone', 'layer1_0', 'conv1', 'conv', 'kernel').
    Returns:
      the state_dict key, e.g. 'backbone.layer1.0.conv1.weight'.
    """
    *mods, leaf = path
    m = re.match(r"^scales_(\d+)$", leaf)
    if m:
        return ".".join([*mods, "scales", m.group(1), "scale"])
    names = []
    for i, part in enumerate(mods):
        if part == "conv" and i > 0:
            parent = mods[i - 1]
            if not any(parent.startswith(c + "_") for c in CONV_MODULES):
                continue  # layers.Conv's inner conv: a plain Conv2d in torch
        names.append(_module_name(part))
    is_norm = bool(mods) and NORM_NAMES.match(mods[-1])
    if collection == "batch_stats":
        leaf_name = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif leaf == "kernel":
        leaf_name = "weight"
    elif leaf == "scale" and is_norm:
        leaf_name = "weight"
    else:
        leaf_name = leaf
    if len(mods) > 1 and mods[0] == "bbox_head" and ROI_HEAD_CHILDREN.match(mods[1]):
        names.insert(0, "roi_head")
    return ".".join([*names, leaf_name])


# RoI features are 7 x 7: the first fc's input is (C, H, W) in torch, (H, W, C) here.
ROI_CELLS = 49


def _to_torch_layout(x, path):
    x = np.asarray(x)
    leaf = path[-1]
    if leaf == "kernel" and x.ndim == 4:
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and x.ndim == 2 and path[-2] == "shared_fcs_0":
        fc = x.shape[1]
        return x.T.reshape(fc, 7, 7, -1).transpose(0, 3, 1, 2).reshape(fc, -1)
    if leaf == "kernel" and x.ndim == 2:
        return x.T  # (in, out) -> (out, in)
    return x


def _to_flax_layout(x, path):
    x = np.asarray(x)
    leaf = path[-1]
    if leaf == "kernel" and x.ndim == 4:
        return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and x.ndim == 2 and path[-2] == "shared_fcs_0":
        if x.shape[1] % ROI_CELLS:
            return x.T  # not 7 x 7 RoI features: the shape check reports it
        fc = x.shape[0]
        return x.reshape(fc, -1, 7, 7).transpose(2, 3, 1, 0).reshape(-1, fc)
    if leaf == "kernel" and x.ndim == 2:
        return x.T
    return x


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def key_table(variables):
    """{torch key: (collection, flax path)} for every leaf of {'params', 'batch_stats'}."""
    table = {}
    for coll in ("params", "batch_stats"):
        for path, _ in _leaves(variables.get(coll, {})):
            table[torch_key(coll, path)] = (coll, path)
    return table


def _buffers(variables, family):
    """Torch-only buffers of a model: BN `num_batches_tracked`, GFL's `integral.project`."""
    out = {}
    for path, _ in _leaves(variables.get("batch_stats", {})):
        if path[-1] == "mean":
            out[torch_key("batch_stats", path).replace("running_mean", "num_batches_tracked")] = (
                np.array(0, np.int64)
            )
    if family == "gfl":
        reg = next(v for p, v in _leaves(variables["params"]) if "gfl_reg" in p and p[-1] == "bias")
        reg_max = np.shape(reg)[0] // 4 - 1
        out["bbox_head.integral.project"] = np.linspace(0, reg_max, reg_max + 1, dtype=np.float32)
    return out


def to_mmdet(variables, family):
    """Flax {'params', 'batch_stats'} -> an mmdetection state_dict (OrderedDict of numpy)."""
    sd = collections.OrderedDict()
    for coll in ("params", "batch_stats"):
        for path, x in _leaves(variables.get(coll, {})):
            sd[torch_key(coll, path)] = _to_torch_layout(x, path)
    sd.update(_buffers(variables, family))
    return sd


def to_flax(state_dict, expected, *, family, skip=(), what="checkpoint"):
    """An mmdetection state_dict -> Flax variables shaped like `expected`, strictly.

    Args:
      state_dict: {key: array} (numpy or torch tensors), optionally with a `module.` prefix.
      expected: the model's {'params', 'batch_stats'} (arrays or ShapeDtypeStructs).
      family: 'retinanet', 'gfl', 'fcos' or 'faster_rcnn' (which buffers to expect).
      skip: regexes of torch keys that may be missing, extra or mis-shaped (those keep the
        value in `expected`).
      what: names the source in errors.
    Returns:
      {'params', 'batch_stats'} of numpy arrays.
    Raises:
      ConversionError listing every missing key, unexpected key, shape mismatch and weight
      that is not floating point (an integer tensor for a float parameter; grouped by dtype),
      or saying in one line that the class count differs or that no weight at all is floating
      point (an integer file, not a detector's weights).
    """
    sd = {}
    for k, v in state_dict.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        for old, new in LEGACY_RENAMES.items():
            if k.startswith(old):
                k = new + k[len(old) :]
        sd[k] = _to_numpy(v.detach().cpu() if hasattr(v, "detach") else v)
    table = key_table(expected)
    buffers = _buffers(expected, family)
    skipped = lambda k: any(re.search(r, k) for r in skip)  # noqa: E731
    for key in CLASSIFIERS:
        if key in sd and key in table and not skipped(key):
            coll, path = table[key]
            want = _leaf(expected, coll, path).shape[-1]
            got = sd[key].shape[0]
            if got != want:
                raise ConversionError(
                    f"{what}: {key} has {got} outputs but the model wants {want}: the checkpoint "
                    f"was trained for a different number of classes than this data set has"
                )
    missing = sorted(k for k in table if k not in sd and not skipped(k))
    missing += sorted(k for k in buffers if k not in sd and not skipped(k))
    unexpected = sorted(k for k in sd if k not in table and k not in buffers and not skipped(k))
    shapes, dtypes, float_weights = [], [], 0
    out = {"params": {}, "batch_stats": {}}
    for key, (coll, path) in table.items():
        ref = _leaf(expected, coll, path)
        if key in sd and not skipped(key):
            float_weights += _is_float(ref.dtype)
            if _is_float(ref.dtype) and not _is_float(sd[key].dtype):
                # Casting integer (or bool, or non-tensor) values into float weights would load
                # garbage silently. Integer buffers (num_batches_tracked) are not in the key
                # table: they are checked as buffers and never loaded.
                dtypes.append((key, str(sd[key].dtype), str(np.dtype(ref.dtype))))
                continue
            x = _to_flax_layout(sd[key], path)
            if tuple(x.shape) != tuple(ref.shape):
                want = _to_torch_layout(np.zeros(ref.shape), path).shape
                shapes.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {tuple(want)}")
                continue
            value = x.astype(ref.dtype)
        else:
            value = np.asarray(ref) if hasattr(ref, "__array__") else np.zeros(ref.shape, ref.dtype)
        _set(out[coll], path, value)
    if "bbox_head.integral.project" in sd and "bbox_head.integral.project" in buffers:
        if not np.allclose(sd["bbox_head.integral.project"], buffers["bbox_head.integral.project"]):
            shapes.append("bbox_head.integral.project: not linspace(0, reg_max, reg_max + 1)")
    if dtypes and len(dtypes) == float_weights:
        # Not one weight is floating point: the file as a whole is the wrong kind (quantised,
        # or indices), which one line says better than a line per key; its key mismatches, if
        # any, would only matter once it holds weights.
        counts = collections.Counter(got for _, got, _ in dtypes)
        kinds = (
            f"are {next(iter(counts))}"
            if len(counts) == 1
            else f"are not floating point ({_and_list([f'{n} {t}' for t, n in counts.items()])})"
        )
        raise ConversionError(
            f"{what}: {len(dtypes)} of {float_weights} weight tensors {kinds}; a detector's "
            f"weights are floating point (is this a quantised or index file?)"
        )
    if missing or unexpected or shapes or dtypes:
        problems = [
            _count(len(missing), "missing key"),
            _count(len(unexpected), "unexpected key"),
            _count(len(shapes), "shape mismatch", "shape mismatches"),
            _count(len(dtypes), "tensor not floating point", "tensors not floating point"),
        ]
        lines = [f"{what} does not match the model: {', '.join(filter(None, problems))}"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {s}" for s in shapes]
        lines += _dtype_lines(dtypes)
        raise ConversionError("\n".join(lines))
    return out


def _count(n, one, many=None):
    """'1 missing key', '3 missing keys', '' for 0."""
    return "" if not n else f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def _dtype_lines(dtypes, per_key=3):
    """Lines for the weights that are not floating point, [(key, dtype, model dtype)]: one per
    key for a dtype with up to `per_key` of them, else one per dtype with a few example keys,
    so a file with many integer weights is a few lines, not one per key."""
    groups = collections.defaultdict(list)
    for key, got, want in dtypes:
        groups[(got, want)].append(key)
    lines = []
    for (got, want), keys in groups.items():
        if len(keys) <= per_key:
            lines += [f"  not floating point: {k}: checkpoint {got} vs model {want}" for k in keys]
        else:
            lines.append(
                f"  not floating point: {len(keys)} tensors are {got} where the model has "
                f"{want}, e.g. {', '.join(keys[:per_key])}"
            )
    return lines


def _is_float(dtype):
    """numpy's floats and ml_dtypes' (bfloat16, float8), which numpy does not call floating."""
    import jax.numpy as jnp  # noqa: PLC0415

    return jnp.issubdtype(np.dtype(dtype), jnp.floating)


def _leaf(tree, coll, path):
    node = tree[coll]
    for p in path:
        node = node[p]
    return node


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def read_checkpoint(path):
    """Reads a `.pth` (safely: `weights_only=True`) or `.safetensors` file.

    Returns (state_dict {key: numpy}, meta dict). Before torch sees a `.pth`, its pickle is read
    opcode by opcode (nothing is run) for the names it would import; one that is not a tensor,
    storage, dtype or plain container (`os.system`, a class of the training code) is refused
    by name. torch's restricted unpickler still does the loading, so whatever that check misses
    is refused there. A refusal, an empty file and a damaged or truncated one are each a
    one-line ConversionError naming the file. bfloat16 tensors come back as ml_dtypes'
    bfloat16 (numpy has no bfloat16 of its own); `to_flax` casts them to the model's dtype.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(
            f"cannot read {path}: empty file (0 bytes); the download or copy did not finish"
        )
    import ml_dtypes  # noqa: PLC0415, F401 (registers numpy's 'bfloat16', which safetensors uses)

    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415 (optional dependency)

        try:
            return dict(load_file(path)), {}
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ConversionError(
                f"cannot read {path}: not a valid .safetensors file, or damaged or truncated "
                f"({_describe(e)})"
            ) from e
    import torch  # noqa: PLC0415 (the `convert` extra)

    imports, parsed = pickled_imports(path)
    foreign = sorted(name for name in imports if not _weights_file_may_import(name))
    if foreign:
        raise ConversionError(
            f"refusing to load {path}: it would import {_and_list(foreign)}, which a weights "
            f"file never holds (code or objects, not tensors); nothing in it was run"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not parsed:  # the pickle stream itself is cut off or garbled: damage, not a refusal
            raise ConversionError(
                f"cannot read {path}: damaged or truncated ({_describe(e)})"
            ) from e
        # A whole, readable pickle that torch's restricted unpickler still turned down: it
        # builds something the name check above does not see (an object's state, an opcode
        # torch does not take, such as protocol 4's FRAME).
        raise ConversionError(
            f"refusing to load {path}: torch.load(weights_only=True), which never runs code "
            f"from a file, turned it down ({_describe(e)})"
        ) from e
    except Exception as e:  # a cut-off zip archive (OSError), a cut-off pickle (EOFError), ...
        raise ConversionError(
            f"cannot read {path}: damaged or truncated, or not a PyTorch checkpoint "
            f"({_describe(e)})"
        ) from e
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    return {k: _to_numpy(v) for k, v in obj.items()}, meta


# A legacy (pre-zip) torch.save file is five pickles in a row: this magic number
# (torch.serialization.MAGIC_NUMBER), the protocol version, sys info, the object and its storage
# keys; raw storage bytes follow. A zip one (torch >= 1.6) keeps its object in `*/data.pkl`.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5
_ZIP_MAGIC = b"PK\x03\x04"
# Names torch.save has always written for tensors and the plain values of a checkpoint's meta
# (mmcv writes str, int, float, tuples, lists and dicts, which need no import; sets and bytes
# do). torch's own allow-list is added where this torch exposes it (`_weights_file_names`).
_PLAIN_NAMES = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "builtins.set",
        "builtins.bytearray",
        "builtins.complex",
        "_codecs.encode",  # bytes, as protocol 2 spells them
        "torch.Size",
        "torch.device",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2",
    }
)


def _and_list(names, limit=3):
    """'a', 'a and b', 'a, b and c', 'a, b, c and 2 more'."""
    if len(names) > limit:
        return f"{', '.join(names[:limit])} and {len(names) - limit} more"
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


def pickled_imports(path):
    """What the pickles of the `.pth` at `path` would import, read without unpickling.

    Returns (names, parsed): the 'module.name' of every GLOBAL, INST, STACK_GLOBAL and EXT
    opcode in the pickles torch.load would unpickle, and whether each of them parsed to its
    STOP. Names come only from pickles that parsed whole, so a damaged or non-pickle file
    (whose bytes can look like any opcode) never reads as a refusal; torch then reports it.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == _ZIP_MAGIC
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                streams = [z.read(n) for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
        except Exception:  # a cut-off archive fails in many ways; torch.load names it
            return set(), False
        names = set()
        for data in streams:
            try:
                names |= _imports_of(io.BytesIO(data))[0]
            except Exception:  # pickletools raises ValueError, UnicodeDecodeError, ...
                return names, False
        return names, bool(streams)
    names = set()
    with open(path, "rb") as f:
        for i in range(_LEGACY_PICKLES):
            start = f.tell()
            if not f.read(1):
                break
            f.seek(start)
            try:
                found, values = _imports_of(f)
            except Exception:  # as above
                return names, False
            names |= found
            if i == 0 and values != [_TORCH_MAGIC]:
                break  # not a torch.save file: torch reads no further than this pickle either
    return names, True


def _imports_of(stream):
    """(names one pickle imports, its first few opcode arguments), by pickletools, which only
    decodes opcodes. Raises where the pickle does not parse to its STOP."""
    names, values, memo, pushed = set(), [], {}, []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.add(_py3_name(*arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            module, name = ([None, None] + pushed)[-2:]
            ok = isinstance(module, str) and isinstance(name, str)
            names.add(_py3_name(module, name) if ok else "a name the pickle computes")
        elif op.name.startswith("EXT"):  # copyreg's extension registry, which pickle reads
            names.add(".".join(copyreg._inverted_registry.get(arg, ("extension code", str(arg)))))
        if arg is not None and op.name not in ("PROTO", "FRAME") and len(values) < 3:
            values.append(arg)
        # STACK_GLOBAL takes module and name from the stack: follow the strings pushed and
        # memoised (protocol 4 memoises a module name once and fetches it again by index).
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed = [*pushed[-1:], memo.get(arg)]
        elif op.stack_after:
            pushed = [*pushed[-1:], arg if isinstance(arg, str) else None]
    return names, values


def _py3_name(module, name):
    """'module.name' as Python 3 (and torch's unpickler) resolves a protocol 2 GLOBAL: with
    the py2 -> py3 renames pickle itself keeps in `_compat_pickle` (`__builtin__.set`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _weights_file_may_import(name):
    """Whether a weights file may name `name`: a tensor rebuild function, storage, dtype or
    plain container (`_PLAIN_NAMES`), or a name torch's weights-only unpickler allows."""
    import torch  # noqa: PLC0415

    module, _, attr = name.rpartition(".")
    if name in _PLAIN_NAMES or name in _weights_file_names():
        return True
    if module == "torch._utils":
        return attr.startswith("_rebuild_")  # _rebuild_tensor_v2, _rebuild_parameter, ...
    if module in ("torch", "torch.storage"):
        return attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype)
    return False


def _weights_file_names():
    """torch's weights-only allow-list, with what this process added to it
    (`torch.serialization.add_safe_globals`); empty for a torch that does not expose them."""
    import torch  # noqa: PLC0415

    names = set()
    try:
        from torch import _weights_only_unpickler as unpickler  # noqa: PLC0415

        names |= set(unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # private: absent in some torch; the names above stay
        pass
    get_safe_globals = getattr(torch.serialization, "get_safe_globals", lambda: [])
    for g in get_safe_globals():
        names.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return names


def _to_numpy(v):
    if not hasattr(v, "numpy"):
        return np.asarray(v)
    if str(v.dtype) == "torch.bfloat16":  # torch cannot hand numpy a bfloat16 array: view bits
        import ml_dtypes  # noqa: PLC0415
        import torch  # noqa: PLC0415

        return v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return v.numpy()


def _describe(exc):
    """'Type: the informative line' of an error, or just 'Type' when its message is empty (an
    empty .pth raises a bare EOFError).

    torch's weights-only refusal opens with a paragraph about its defaults; what it met is on
    the line after "WeightsUnpickler error:" (torch < 2.6) or in the next paragraph. Only the
    wording of the message depends on this; whether a file is refused never does.
    """
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    elif text.startswith("Weights only load failed") and "\n\n" in text.strip():
        text = text.strip().split("\n\n", 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def write_pth(path, state_dict, meta):
    """Writes {'meta': meta, 'state_dict': tensors} as mmdetection saves checkpoints."""
    import torch  # noqa: PLC0415

    # A copy: arrays restored from a checkpoint are read-only, which torch warns about (and a
    # tensor sharing their memory could write into them).
    sd = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, order="C"))) for k, v in state_dict.items()
    )
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save({"meta": meta, "state_dict": sd}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed save or rename leaves no partial file behind
            os.remove(tmp)


def write_orbax(directory, variables, meta):
    """Writes converted variables as a step-0 jdistill checkpoint that `teacher.init` loads."""
    import jax.numpy as jnp  # noqa: PLC0415

    mgr = checkpoint.manager(directory, keep=1)
    state = {
        "params": {"student": variables["params"]},
        "batch_stats": variables["batch_stats"],
        "step": jnp.int32(0),
    }
    checkpoint.save(mgr, 0, state, {}, meta, force=True)
    mgr.wait_until_finished()
    mgr.close()


def is_backbone_only(state_dict):
    """True for an ImageNet classifier checkpoint (torchvision / detectron caffe ResNet):
    no `backbone.`, `neck.` or `bbox_head.` keys."""
    return not any(k.split(".", 1)[0] in ("backbone", "neck", "bbox_head") for k in state_dict)


def pretrained_backbone(state_dict):
    """An ImageNet ResNet state_dict as a detector's: `backbone.` prefix, classifier `fc.*`
    dropped (mmdetection loads backbones non-strictly, ignoring fc)."""
    return {f"backbone.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}


def load_variables(path, expected, *, family, skip=(), what="checkpoint", backbone_ok=True):
    """Variables for `expected` from a `.pth`/`.safetensors` file, strictly.

    A whole-detector checkpoint must match every key. An ImageNet backbone checkpoint fills the
    backbone only (every backbone key must match); neck and head keep their values in
    `expected`, as mmdetection's `init_cfg=Pretrained` for the backbone does.
    `backbone_ok=False` (a teacher) refuses a backbone-only file.
    Returns (variables, class names from the checkpoint's meta or None).
    """
    sd, meta = read_checkpoint(path)
    what = what if path in what else f"{what} {path}"  # every error names the file
    if is_backbone_only(sd):
        if not backbone_ok:
            raise ConversionError(
                f"{what} holds only an ImageNet backbone (no neck or head keys); a teacher "
                f"must be a whole trained detector"
            )
        sd = pretrained_backbone(sd)
        skip = (*skip, r"^neck\.", r"^bbox_head\.")
    variables = to_flax(sd, expected, family=family, skip=skip, what=what)
    return variables, meta.get("CLASSES")
