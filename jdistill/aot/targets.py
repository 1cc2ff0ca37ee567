"""Accelerators a step can be compiled for without the hardware: each target's published peak
and memory figures, and its compile-only devices from jax's deviceless topologies.

A target is written `<name>:<size>`: `h100:8` (8 GPUs; more than 8 are hosts of 8, so `h100:64`
is 8 hosts), `a100:8`, and TPU slices by chip grid, `v5e:2x2`, `v4:2x2x1`, `v5p:2x2x1`,
`v6e:2x2`. GPUs need jax's CUDA plugin, which loads without a GPU; TPUs need libtpu.
"""

import dataclasses
import importlib.util
import math
import os
import re

import jax
from jax.experimental import topologies

GIB = 1024**3
_HERE = os.path.dirname(os.path.abspath(__file__))


class TargetError(ValueError):
    """A target that cannot be compiled for here (unknown, malformed, or its plugin missing);
    the message is one line that names what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures.

    peak_flops: dense bf16 FLOP/s. hbm_bytes_per_s: memory bandwidth. memory: bytes of device
    memory. usable: the share of it a program may take (see `CHIPS`). source: where the
    figures are published. gpu_config: the GpuTargetConfigProto file (GPUs).
    host_bounds: chips per host (TPUs).
    """

    name: str
    platform: str
    peak_flops: float
    hbm_bytes_per_s: float
    memory: int
    usable: float
    source: str
    gpu_config: str = ""
    host_bounds: tuple = ()


# JAX preallocates 75 % of a GPU's memory for XLA by default (XLA_PYTHON_CLIENT_MEM_FRACTION,
# jax docs "GPU memory allocation"); a step that needs more fails unless the user raises it.
# A TPU's HBM is the compiler's own but for the runtime's small reservation.
_GPU_USABLE = 0.75
_TPU_USABLE = 0.95

CHIPS = {
    "h100": Chip(
        "h100",
        "cuda",
        989.4e12,
        3.35e12,
        80 * GIB,
        _GPU_USABLE,
        "NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3",
        gpu_config="h100_sxm.txtpb",
    ),
    "a100": Chip(
        "a100",
        "cuda",
        312e12,
        2.039e12,
        80 * GIB,
        _GPU_USABLE,
        "NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB: 312 TFLOP/s dense BF16, 2,039 GB/s",
        gpu_config="a100_sxm.txtpb",
    ),
    "v4": Chip(
        "v4",
        "tpu",
        275e12,
        1.2e12,
        32 * GIB,
        _TPU_USABLE,
        "Google Cloud TPU docs, TPU v4: 275 TFLOP/s BF16, 32 GiB HBM2 at 1,200 GB/s per chip",
        host_bounds=(2, 2, 1),
    ),
    "v5e": Chip(
        "v5e",
        "tpu",
        197e12,
        819e9,
        16 * GIB,
        _TPU_USABLE,
        "Google Cloud TPU docs, TPU v5e: 197 TFLOP/s BF16, 16 GB HBM2 at 819 GB/s per chip",
        host_bounds=(2, 2, 1),
    ),
    "v5p": Chip(
        "v5p",
        "tpu",
        459e12,
        2.765e12,
        95 * GIB,
        _TPU_USABLE,
        "Google Cloud TPU docs, TPU v5p: 459 TFLOP/s BF16, 95 GB HBM2e at 2,765 GB/s per chip",
        host_bounds=(2, 2, 1),
    ),
    "v6e": Chip(
        "v6e",
        "tpu",
        918e12,
        1.64e12,
        32 * GIB,
        _TPU_USABLE,
        "Google Cloud TPU docs, TPU v6e (Trillium): 918 TFLOP/s BF16, 32 GB HBM at 1,640 GB/s",
        host_bounds=(2, 2, 1),
    ),
}

EXAMPLES = "h100:8, h100:64, a100:8, v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2"


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed `<chip>:<size>`: `topology` is what jax's topology API takes, `num_devices`
    the devices it gives."""

    spec: str
    chip: Chip
    topology: str
    num_devices: int
    num_hosts: int


def parse(spec):
    """`Target` of a `<chip>:<size>` string; raises TargetError naming the known ones."""
    name, _, size = spec.partition(":")
    chip = CHIPS.get(name.lower())
    if chip is None:
        raise TargetError(
            f"--target={spec}: unknown accelerator {name!r}; known: {', '.join(CHIPS)} "
            f"(e.g. {EXAMPLES})"
        )
    if chip.platform == "cuda":
        if not re.fullmatch(r"[1-9]\d*", size):
            raise TargetError(f"--target={spec}: a GPU target is <chip>:<GPUs>, e.g. {name}:8")
        n = int(size)
        if n > 8 and n % 8:
            raise TargetError(
                f"--target={spec}: more than 8 GPUs are hosts of 8, so the count must be a "
                "multiple of 8"
            )
        hosts = max(1, n // 8)
        return Target(spec, chip, f"1x{hosts}x{min(n, 8)}", n, hosts)
    dims = size.split("x")
    if not size or not all(re.fullmatch(r"[1-9]\d*", d) for d in dims) or len(dims) > 3:
        raise TargetError(
            f"--target={spec}: a TPU target is <chip>:<chip grid>, e.g. {name}:2x2 or {name}:2x2x1"
        )
    grid = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    n = math.prod(grid)
    hosts = math.prod(math.ceil(g / b) for g, b in zip(grid, chip.host_bounds, strict=True))
    return Target(spec, chip, f"{name}:{size}", n, hosts)


def install_hint(chip):
    """The pip command that gives this process the compiler for `chip`."""
    extra = "cuda12" if chip.platform == "cuda" else "tpu"
    return f'pip install "jax[{extra}]=={jax.__version__}" (README, "Before you rent")'


def plugin_present(chip):
    """Whether the compiler for `chip` (jax's CUDA plugin, or libtpu) is installed."""
    module = "jax_plugins.xla_cuda12" if chip.platform == "cuda" else "libtpu"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def gpu_config_text(chip):
    """The chip's GpuTargetConfigProto text (this package's own file)."""
    with open(os.path.join(_HERE, "gpu_targets", chip.gpu_config)) as f:
        return f.read()


def devices(target):
    """The target's compile-only devices (`target.num_devices` of them).

    Raises TargetError when the chip's plugin is missing, naming the install.
    """
    chip = target.chip
    if not plugin_present(chip):
        what = "jax's CUDA plugin" if chip.platform == "cuda" else "libtpu"
        raise TargetError(
            f"--target={target.spec} needs {what}, which this Python lacks: {install_hint(chip)}"
        )
    if chip.platform == "cuda":
        topo = topologies.get_topology_desc(
            topology_name=chip.name,
            platform="cuda",
            target_config=gpu_config_text(chip),
            topology=target.topology,
        )
    else:
        grid = [int(d) for d in target.topology.split(":")[1].split("x")]
        grid += [1] * (3 - len(grid))
        bounds = tuple(min(g, b) for g, b in zip(grid, chip.host_bounds, strict=True))
        topo = topologies.get_topology_desc(
            topology_name=target.topology,
            platform="tpu",
            chip_config_name="default",
            chips_per_host_bounds=bounds,
            num_slices=1,
            wrap=(False, False, False),
        )
    found = list(topo.devices)
    if len(found) != target.num_devices:
        raise TargetError(
            f"--target={target.spec}: the topology gave {len(found)} devices, expected "
            f"{target.num_devices}"
        )
    return found
