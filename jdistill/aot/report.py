"""One config compiled for one target without the hardware: its train and predict programs,
their memory per device, FLOPs, memory traffic and roofline, and the largest batch that fits.

The experiment is built by `experiment.setup(abstract=True)`, the path training takes, with
the state and teacher as shapes only: nothing is allocated and no checkpoint is read.
"""

import dataclasses
import math
import time

import jax
import ml_collections

from jdistill import config_lib, experiment, parallel
from jdistill.aot import traffic as traffic_lib
from jdistill.data import datasets

GIB = 1024**3
# Classes of the data sets the configs name, for building the heads (their count changes the
# heads' widths, not the backbone's traffic).
_CLASSES = {"voc_folder": 20, "tfds_voc": 20}
_COCO_CLASSES = 80


def row(key, value):
    """Prints one `key  value` row at once (as `scripts/benchmark.py` prints its rows)."""
    print(f"{key:<34}  {value}", flush=True)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device of a compiled program; `total` is what it needs at once: arguments,
    temporaries, outputs (less those aliasing a donated argument) and code."""

    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    code: int

    @property
    def total(self):
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled step: `flops` per step (all devices), `traffic` of one device's program."""

    what: str
    batch_per_device: int
    num_devices: int
    compile_s: float
    memory: Memory
    flops: float
    traffic: traffic_lib.Traffic
    hlo: str

    @property
    def images(self):
        return self.batch_per_device * self.num_devices

    def fits(self, chip):
        return self.memory.total <= chip.usable * chip.memory


def num_classes(config, given=0):
    """`given`, or the class count of the config's data set (COCO's 80, VOC's 20)."""
    return given or _CLASSES.get(config.data.builder, _COCO_CLASSES)


def canvas(config):
    """The config's largest canvas (H, W) by area: a step's worst case."""
    return max((tuple(c) for c in config.data.canvases), key=lambda c: c[0] * c[1])


def at_batch(config, batch_size):
    """A copy of `config` whose global batch is `batch_size`."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.batch_size = batch_size
    cfg.lock()
    return cfg


def _memory(compiled):
    m = compiled.memory_analysis()
    return Memory(
        m.argument_size_in_bytes,
        m.temp_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.generated_code_size_in_bytes,
    )


def _flops(fn, args, compiled, num_devices):
    """FLOPs per step over all devices: the compiled program's estimate (one device's, after
    partitioning) where the backend gives one (TPU), else XLA's estimate of the unpartitioned
    program lowered for this process's CPU (XLA's GPU compiler gives none, and a compile-only
    device cannot analyse a lowering)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (a backend without the analysis)
        cost = None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if cost and cost.get("flops"):
        return float(cost["flops"]) * num_devices
    bare = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        cost = jax.jit(fn.__wrapped__).lower(*bare).cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else math.nan


def _compile(what, fn, args, batch_per_device, num_devices):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    return Program(
        what,
        batch_per_device,
        num_devices,
        seconds,
        _memory(compiled),
        _flops(fn, args, compiled, num_devices),
        traffic_lib.count(hlo),
        hlo,
    )


def compile_steps(config, devices, batch_per_device, classes, predict=True):
    """(train `Program`, predict `Program` or None) of `config` at `batch_per_device` images on
    each of `devices` (compile-only ones from `targets.devices`, or real ones)."""
    mesh = parallel.make_mesh(devices)
    n = mesh.size
    cfg = at_batch(config, batch_per_device * n)
    config_lib.check(cfg)
    hw = canvas(cfg)
    exp = experiment.setup(
        cfg, mesh, num_classes=classes, canvas=hw, steps_per_epoch=1000, abstract=True
    )
    batch = datasets.abstract_batch(cfg.batch_size, hw, cfg.data.max_boxes, mesh)
    train = _compile(
        "train", exp.train_step, (exp.state, exp.teacher_vars, batch), batch_per_device, n
    )
    if not predict:
        return train, None
    variables = {"params": exp.state["params"]["student"], "batch_stats": exp.state["batch_stats"]}
    predict_fn = jax.jit(
        experiment.make_predict(exp.student, cfg.model),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
    )
    variables = experiment.with_sharding(variables, lambda _: parallel.replicated(mesh))
    pred = _compile("predict", predict_fn, (variables, batch), batch_per_device, n)
    return train, pred


def fit(config, devices, chip, classes, first):
    """(the largest batch per device whose train step fits `chip`'s usable memory, its
    `Program`), from `first` (a compiled `Program` at some batch) and a second compile at
    twice that batch: memory is close to linear in the batch, so the line through the two
    predicts the largest batch, and compiles around it settle it exactly."""
    cache = {first.batch_per_device: first}

    def at(b):
        if b not in cache:
            cache[b] = compile_steps(config, devices, b, classes, predict=False)[0]
        return cache[b]

    b0 = first.batch_per_device
    b1 = 2 * b0
    m0, m1 = first.memory.total, at(b1).memory.total
    per_image = max(1.0, (m1 - m0) / (b1 - b0))
    guess = max(1, int((chip.usable * chip.memory - (m0 - per_image * b0)) // per_image))
    b = guess
    if at(b).fits(chip):
        while at(b + 1).fits(chip):
            b += 1
    else:
        while b > 1 and not at(b).fits(chip):
            b -= 1
        if not at(b).fits(chip):
            return 0, at(b)
    return b, at(b)


def _gib(n):
    """Bytes as GiB: 2 decimals, or 2 significant digits below 0.1 GiB (tiny test programs)."""
    g = n / GIB
    return f"{g:.2f}" if g >= 0.1 or g == 0 else f"{g:.2g}"


def memory_rows(p, chip):
    m = p.memory
    share = 100 * m.total / chip.memory
    of = f"{share:.1f} % of {chip.memory / GIB:.0f} GiB"
    row(f"{p.what} memory/device", f"{m.total / GIB:.2f} GiB ({of})")
    row(
        f"{p.what}   arguments/temps/outputs",
        f"{m.arguments / GIB:.2f} / {m.temporaries / GIB:.2f} / {m.outputs / GIB:.2f} GiB "
        f"({m.aliased / GIB:.2f} aliased, code {m.code / 2**20:.0f} MiB)",
    )


def traffic_rows(p, chip, top=10):
    """The bytes per image by kind, the largest instructions, and the roofline."""
    t = p.traffic
    per_image = t.total / p.batch_per_device
    step = f"{_gib(t.total)} GiB per device-step"
    row(f"{p.what} HBM bytes/image", f"{_gib(per_image)} GiB ({step})")
    for kind in traffic_lib.KINDS:
        if t.by_kind.get(kind):
            row(
                f"  {kind}",
                f"{_gib(t.by_kind[kind] / p.batch_per_device)} GiB/image "
                f"({100 * t.by_kind[kind] / t.total:.0f} %, {t.count[kind]} instructions)",
            )
    flops_image = p.flops / p.images
    row(f"{p.what} FLOPs/step", f"{p.flops / 1e12:.3f} TFLOP ({flops_image / 1e12:.3f} per image)")
    compute = chip.peak_flops / flops_image if flops_image > 0 else math.inf
    memory = chip.hbm_bytes_per_s / per_image
    bound = "memory" if memory < compute else "compute"
    row(
        f"{p.what} roofline images/s/device",
        f"{min(compute, memory):.0f} ({bound}-bound; compute {compute:.0f}, memory {memory:.0f})",
    )
    for b, kind, name, op_name in t.top[:top]:
        row(f"  {b / GIB:6.3f} GiB  {kind}", f"{name}  {op_name[:110]}")
