"""The one DeepSpeed adapter: every DeepSpeed file name and every use of a DeepSpeed private attribute or method
lives here, each checked against DeepSpeed CHECKED_VERSION (constraints.txt pins it).

Public DeepSpeed API (deepspeed.initialize, engine.save_checkpoint / load_checkpoint,
deepspeed.utils.safe_set_full_fp32_param, ...) is called where it is used; what DeepSpeed does not promise
(file names, private methods, attributes it sets in its constructors) is reached only through the functions
below. `check_assumptions()` verifies each of them against the installed DeepSpeed;
tests/test_deepspeed_compat.py runs it, so that a DeepSpeed that breaks one fails naming it.

Also here: `CheckpointIO`, the wrapper that routes every file DeepSpeed writes during a save (its checkpoint
engine's save / makedirs, and the recovery scripts it copies) through our save-error handling, and
`ensure_torch_extensions_dir`, which keeps DeepSpeed's JIT-built ops apart per environment.

A leaf module: stdlib, torch, megatron.errors and megatron.fileio; DeepSpeed is imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import sys
from typing import Callable, Iterator, Optional

from megatron.errors import CheckpointError
from megatron.fileio import with_retries

CHECKED_VERSION = "0.19.8"  # the DeepSpeed every assumption below was checked against
ADAPTER = "megatron/deepspeed_compat.py"


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


# ---- file names (deepspeed/runtime/engine.py and runtime/pipe/module.py, checked against DeepSpeed 0.19.8) -----

LATEST_FILENAME = "latest"  # DeepSpeed's pointer file in the save directory: the tag of the newest checkpoint
LATEST_UNIVERSAL_FILENAME = "latest_universal"  # its pointer to the newest universal folder (ds_to_universal)
UNIVERSAL_ZERO_DIR = "zero"  # a universal folder's per-parameter directory: zero/<param name>/{fp32,exp_avg,...}.pt
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # copied into the save directory by a ZeRO save
MODEL_STATES_SUFFIX = "_model_states.pt"
OPTIM_STATES_SUFFIX = "_optim_states.pt"

MODEL_STATES_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # group 1: mp rank
ZERO3_MODEL_STATES_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")  # dp rank, mp rank
# The model-states file of either kind for dp rank 0 (what ds_to_universal copies): group 2 is the mp rank.
DP0_MODEL_STATES_FILE = re.compile(r"^(zero_pp_rank_0_)?mp_rank_(\d+)_model_states\.pt$")
LAYER_STATES_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")  # layer index, tp rank
OPTIM_STATES_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # bf16, dp, mp
GLOBAL_STEP_TAG = re.compile(r"^global_step(\d+)$")


def model_states_name(mp_rank: int) -> str:
    """DeepSpeedEngine._get_ckpt_name without ZeRO-3: module weights and client state of one mp rank."""
    return f"mp_rank_{mp_rank:02d}{MODEL_STATES_SUFFIX}"


def zero3_model_states_name(dp_rank: int, mp_rank: int) -> str:
    """DeepSpeedEngine._get_ckpt_name under ZeRO-3 (partitioned weights): one file per dp rank."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}{MODEL_STATES_SUFFIX}"


def layer_states_name(layer: int, tp_rank: int) -> str:
    """PipelineModule.ckpt_layer_path on a PipeModelDataParallelTopology: one pipeline layer's weights."""
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def optim_states_name(dp_rank: int, mp_rank: int, bf16: bool = False) -> str:
    """DeepSpeedEngine._get_rank_zero_ckpt_name: one dp rank's ZeRO (or BF16-optimizer, `bf16_`) shard."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}{OPTIM_STATES_SUFFIX}"


def is_optim_states_file(name: str) -> bool:
    return name.endswith(OPTIM_STATES_SUFFIX)


def global_step_tag(iteration: int) -> str:
    """The tag DeepSpeedEngine.save_checkpoint gives a checkpoint when none is passed."""
    return f"global_step{iteration}"


# ---- private attributes and methods ------------------------------------------------------------------------

def fp32_opt_state_partition(optimizer, param, key: Optional[str] = None):
    """ZeRO-3: this rank's flat fp32 partition of `param` for optimizer state `key` (None: the fp32 master).
    Relies on DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition(param, release_swap_buffers,
    optim_state_key) returning (partition, ...); checked against DeepSpeed 0.19.8."""
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    return partition


def param_partition_rank(optimizer, param) -> int:
    """ZeRO-3: this rank's index among the ranks that partition `param`. Relies on
    DeepSpeedZeroOptimizer_Stage3._get_param_partition_rank(param); checked against DeepSpeed 0.19.8."""
    return optimizer._get_param_partition_rank(param)


# The attribute holding the flat fp32 partitions (one per param group), per optimizer wrapper.
FLAT_FP32_PARTITIONS = {"DeepSpeedZeroOptimizer": "single_partition_of_fp32_groups",
                        "BF16_Optimizer": "fp32_groups_flat_partition",
                        "DeepSpeedZeroOptimizer_Stage3": "fp32_partitioned_groups_flat"}


def flat_fp32_partitions(optimizer) -> Optional[list]:
    """The flat fp32 partitions (one per param group) that ZeRO-1/2 (`single_partition_of_fp32_groups`), the
    BF16 optimizer (`fp32_groups_flat_partition`) or ZeRO-3 (`fp32_partitioned_groups_flat`) step; None for
    another optimizer. Relies on those attributes, set in the wrappers' constructors; checked against
    DeepSpeed 0.19.8."""
    for attr in FLAT_FP32_PARTITIONS.values():
        flats = getattr(optimizer, attr, None)
        if flats is not None:
            return flats
    return None


def relink_hp_optimizer_states(optimizer) -> None:
    """After creating optimizer states by hand before the first step: make the ZeRO-1/2 or BF16 optimizer link
    each parameter's `_hp_mapping` to them again. Relies on `_hp_optimizer_states_linked` and
    `_lazy_init_hp_params_optimizer_state()` of DeepSpeedZeroOptimizer / BF16_Optimizer (ZeRO-3 has neither
    and needs nothing); checked against DeepSpeed 0.19.8."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def hp_mapping(param):
    """The map from a ZeRO-1/2 / BF16-optimizer parameter to its fragment of the flat fp32 partition (with
    `param_group_index` and `hp_fragment_address.start/.numel`), None where this rank holds none of it or
    without such an optimizer. Relies on `param._hp_mapping` (deepspeed.utils.tensor_fragment.tensor_fragment);
    checked against DeepSpeed 0.19.8."""
    return getattr(param, "_hp_mapping", None)


def has_hp_mapping(param) -> bool:
    """Whether DeepSpeed's tensor-fragment API (safe_set_full_optimizer_state, ...) can address `param`: it has
    `param._hp_mapping` (set, possibly to None, by ZeRO-1/2 and the BF16 optimizer); checked against 0.19.8."""
    return hasattr(param, "_hp_mapping")


def synchronize_tied_weights(pipeline_module) -> None:
    """Broadcast each tied weight from the stage that owns it. Relies on
    PipelineModule._synchronize_tied_weights(); checked against DeepSpeed 0.19.8."""
    pipeline_module._synchronize_tied_weights()


def tied_weights_and_groups(pipeline_module) -> list:
    """[(weight, process group of the stages that share it)] of a PipelineModule ([] for another module).
    PipelineEngine._exec_reduce_tied_grads all-reduces each weight's .grad over that group and skips a weight
    whose .grad is None, so a caller that moves the gradient elsewhere (mixed_precision.accumulate_in_fp32)
    sums it itself. Checked against DeepSpeed 0.19.8."""
    if not callable(getattr(pipeline_module, "get_tied_weights_and_groups", None)):
        return []
    return list(pipeline_module.get_tied_weights_and_groups())


def loss_scale(optimizer) -> Optional[float]:
    """The current fp16 loss scale of DeepSpeed's optimizer wrapper, None without one. Relies on `cur_scale`
    (a property of the ZeRO optimizers) or `loss_scale_config.cur_scale` (FP16_Optimizer at ZeRO-0); checked
    against DeepSpeed 0.19.8."""
    scale = getattr(optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scale_config", None), "cur_scale", None)
    return None if scale is None else float(scale)


def zero_partition_group(optimizer):
    """The process group a ZeRO / BF16 optimizer partitions its state over, None for another optimizer. Relies on
    `dp_process_group`, set in their constructors; checked against DeepSpeed 0.19.8."""
    return getattr(optimizer, "dp_process_group", None)


@contextlib.contextmanager
def universal_folder_names(optimizer, folder_of: Callable[[str], str]) -> Iterator[None]:
    """DeepSpeed's universal loader (checked against 0.19.8) finds each parameter's folder as
    `zero/<optimizer.param_names[param]>`; point those names at `folder_of(name)` for the length of the load.
    Relies on `param_names` ({param: name}, set by the ZeRO / BF16 optimizers' constructors)."""
    original = getattr(optimizer, "param_names", None)
    if original is None:
        raise CheckpointError(f"{type(optimizer).__name__} has no param_names: DeepSpeed {deepspeed_version()}'s "
                              f"universal loader is not the one {ADAPTER} was checked against ({CHECKED_VERSION})")
    optimizer.param_names = {param: folder_of(name) for param, name in original.items()}
    try:
        yield
    finally:
        optimizer.param_names = original


def replace_fp32_gradient_clipping(engine, clip: Callable[[], None]) -> None:
    """Make `clip()` run where DeepSpeed clips fp32 gradients without ZeRO: DeepSpeedEngine._take_model_step
    calls `self.clip_fp32_gradients()` when gradient_clipping > 0; an instance attribute replaces it. Checked
    against DeepSpeed 0.19.8."""
    engine.clip_fp32_gradients = clip


def wrap_pipeline_instructions(engine, wrap: Callable[[Callable, str], Callable]) -> bool:
    """Wrap each instruction of a PipelineEngine's schedule: `wrap(fn, instruction_class_name)` for each entry
    of the class-level `_INSTRUCTION_MAP`, installed on the instance (train_batch looks it up as
    `self._INSTRUCTION_MAP`). False (nothing done) for an engine without one. Checked against DeepSpeed 0.19.8."""
    instructions = getattr(type(engine), "_INSTRUCTION_MAP", None)
    if not isinstance(instructions, dict):
        return False
    engine.__dict__["_INSTRUCTION_MAP"] = {cmd: wrap(fn, cmd.__name__) for cmd, fn in instructions.items()}
    return True


BACKWARD_REDUCE_TIMER = "bwd_allreduce_microstep"  # deepspeed.utils.timer.BACKWARD_REDUCE_MICRO_TIMER


def replace_timer_log(engine, log: Callable[..., None]) -> None:
    """Make `log(names, *args, **kwargs)` run where DeepSpeed's engines print their wall-clock timers: they call
    `self.timers.log(names, ...)` on their SynchronizedWallClockTimer; an instance attribute replaces it.
    Checked against DeepSpeed 0.19.8."""
    engine.timers.log = log


def set_gradient_allreduce(engine, enabled: bool, pipeline: bool) -> None:
    """Switch DeepSpeed's gradient all-reduce over data parallelism: DeepSpeedEngine.backward reads
    `enable_backward_allreduce`; a PipelineEngine keeps that off and reduces in its ReduceGrads instruction,
    which reads `pipeline_enable_backward_allreduce`. Checked against DeepSpeed 0.19.8."""
    if pipeline:
        engine.pipeline_enable_backward_allreduce = enabled
    else:
        engine.enable_backward_allreduce = enabled


def ulysses_gradient_scale(zero_section: dict, sp_size: int) -> float:
    """The factor by which the loss is multiplied before `engine.backward` so that DeepSpeed's gradient reduction
    over the sequence × data group sums over Ulysses' sp ranks and averages over dp only (what our per-rank loss,
    this rank's token-loss sum / the whole sequence's token count, needs).

    Checked against DeepSpeed 0.19.8: its ZeRO-0 all-reduce and ZeRO-1/2 divide the group's sum by
    (group size / sp), so 1 there; ZeRO-3's reduce-scatter path (`__avg_scatter_grads`, taken whenever
    `reduce_scatter` is on) averages over the whole group without that correction, so sp there. ZeRO-3 with
    reduce_scatter off mixes both paths by bucket size (its contiguous path corrects, the other does not): refused.
    (The pipeline engine sees no sequence axis at all: model/pipeline.py's loss corrects it there.)
    `zero_section`: the DeepSpeed config's "zero_optimization" (reduce_scatter defaults to true there)."""
    if sp_size == 1 or zero_section.get("stage", 0) != 3:
        return 1.0
    if not zero_section.get("reduce_scatter", True):
        raise ValueError("ZeRO-3 with \"reduce_scatter\": false in the DeepSpeed config cannot run under "
                         f"--ds-sequence-parallel-size {sp_size}: DeepSpeed {CHECKED_VERSION} then averages some "
                         "gradient buckets over the sequence-parallel ranks and sums others; drop the setting")
    return float(sp_size)


def partition_zero3_parameters(model, group, config: dict, mpu) -> None:
    """Partition `model`'s parameters for ZeRO-3 over `group` now (deepspeed.zero.Init's public `module=` form).

    Checked against DeepSpeed 0.19.8: deepspeed.initialize converts a module whose parameters are not ZeRO-3
    parameters yet over `mpu.get_data_parallel_group()` (DeepSpeedZeRoOffload._convert_to_zero_parameters), the
    data-parallel group alone, whereas its ZeRO-3 optimizer reduces over the sequence × data group: under Ulysses
    every sp rank would then keep the gradient of its own part of the sequence. Parameters converted here over
    the sequence × data group (what upstream's model_provider does with zero.Init) are left as they are."""
    import deepspeed

    deepspeed.zero.Init(module=model, data_parallel_group=group, config_dict_or_path=config, mpu=mpu)


# ---- the checkpoint write wrapper ---------------------------------------------------------------------------

class CheckpointIO:
    """Wraps DeepSpeed's checkpoint engine for one save or load (checked against DeepSpeed 0.19.8: the engine
    writes through `engine.checkpoint_engine.save / makedirs`, and copies RECOVERY_SCRIPTS into the save
    directory with `engine._copy_recovery_script(save_path)` / shutil.copyfile on global rank 0 of a ZeRO save).

    Saving: a failed write (ENOSPC, EACCES, EIO, or torch's "unexpected pos" on a full disk), the recovery
    scripts' copy included, is recorded in `errors`, not raised, so this rank still reaches the collectives
    inside DeepSpeed's save_checkpoint and every rank can agree afterwards that the save failed; the files
    written are remembered so that this rank fsyncs and checksums exactly what it wrote (on a parallel
    filesystem only the writer can flush its pages).
    Loading: reads that fail with a transient error (EIO, ESTALE, EAGAIN: Lustre under load) are retried;
    `preloaded(path)` may hand over an object already read from `path` (the resume's reader read it: one read
    per file), None to read it; `on_load(path, obj)` is told of each file read.
    """

    def __init__(self, engine, retries: int = 3, backoff_s: float = 1.0, log: Callable[[str], None] = print,
                 drop_optimizer: bool = False, preloaded: Optional[Callable[[str], object]] = None,
                 on_load: Optional[Callable[[str, object], None]] = None):
        if not hasattr(engine, "checkpoint_engine"):
            raise CheckpointError(f"this DeepSpeed ({deepspeed_version()}) has no engine.checkpoint_engine; "
                                  f"{ADAPTER} was checked against DeepSpeed {CHECKED_VERSION}")
        self.engine, self.inner = engine, engine.checkpoint_engine
        self.retries, self.backoff_s, self.log = retries, backoff_s, log
        self.drop_optimizer = drop_optimizer
        self.preloaded, self.on_load = preloaded, on_load
        self.errors: list[tuple[str, BaseException]] = []
        self.written: list[str] = []

    def __enter__(self) -> "CheckpointIO":
        self.engine.checkpoint_engine = self
        copy = getattr(self.engine, "_copy_recovery_script", None)
        if copy is not None:
            self.engine.__dict__["_copy_recovery_script"] = self._recording_copy(copy)
        return self

    def __exit__(self, *exc) -> None:
        self.engine.checkpoint_engine = self.inner
        self.engine.__dict__.pop("_copy_recovery_script", None)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _recording_copy(self, copy: Callable[[str], None]) -> Callable[[str], None]:
        def copy_recovery_script(save_path):
            if self.errors:  # after the first failure, do not fill the disk further
                return None
            try:
                copy(save_path)
            except OSError as error:
                path = error.filename or os.path.join(save_path, RECOVERY_SCRIPTS[0])
                self.errors.append((os.fspath(path), error))
            return None
        return copy_recovery_script

    def save(self, state_dict, path: str):
        if self.errors:  # after the first failure, do not fill the disk further
            return None
        if self.drop_optimizer:
            state_dict = without_optimizer_state(state_dict)
            if state_dict is None:
                return None
        try:
            self.inner.save(state_dict, path)
            self.written.append(path)
        except (OSError, RuntimeError) as error:
            self.errors.append((path, error))
        return None

    def makedirs(self, path, exist_ok=False):
        try:
            return self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as error:
            self.errors.append((path, error))
            return None

    def load(self, path: str, map_location=None):
        already = self.preloaded(path) if self.preloaded is not None else None
        if already is not None:
            return already
        obj = with_retries(lambda: self.inner.load(path, map_location=map_location), path,
                           self.retries, self.backoff_s, self.log)
        if self.on_load is not None:
            self.on_load(path, obj)
        return obj


def without_optimizer_state(state_dict):
    """--no-save-optim: what DeepSpeed (checked against 0.19.8) asks to save, minus the optimizer state. A ZeRO /
    BF16-optimizer shard (`*_optim_states.pt`, key "optimizer_state_dict": fp32 masters and moments) is not
    written at all (None); the model-states file keeps everything but its "optimizer" entry (the plain
    optimizer's state without ZeRO), so weights, LR schedule and our client state stay."""
    if not isinstance(state_dict, dict):
        return state_dict
    if "optimizer_state_dict" in state_dict:
        return None
    if state_dict.get("optimizer") is not None:
        return {**state_dict, "optimizer": None}
    return state_dict


# ---- where DeepSpeed JIT-builds its ops ---------------------------------------------------------------------

_announced = False


def _cache_root() -> str:
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def torch_extensions_dir_for_environment() -> str:
    """A TORCH_EXTENSIONS_DIR of this environment's own: Python, torch and DeepSpeed versions and the
    interpreter's prefix (one per virtual environment), under the user's cache like torch's default."""
    from importlib import metadata

    import torch

    try:
        ds = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        ds = "none"
    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    key = (f"megatron-py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-ds{ds}-{prefix}"
           .replace("+", "_").replace(os.sep, "_"))
    return os.path.join(_cache_root(), "torch_extensions", key)


def ensure_torch_extensions_dir(rank: int = 0, log: Callable[[str], None] = print) -> str:
    """Before anything can JIT-build a DeepSpeed op: when TORCH_EXTENSIONS_DIR is not set, set it to this
    environment's own directory (torch's default, ~/.cache/torch_extensions/py311_cpu, is shared by every
    environment, and another DeepSpeed version's build found there breaks the start: "module
    'deepspeed_shm_comm' has no attribute 'vector_kernel_level'"). When the ops are not built there yet, says once,
    on rank 0, that the first start compiles them (~25 s each). A user's value is never changed. Returns the
    directory in use."""
    global _announced
    chosen = os.environ.get("TORCH_EXTENSIONS_DIR")
    given = bool(chosen)
    if not given:
        chosen = torch_extensions_dir_for_environment()
        os.environ["TORCH_EXTENSIONS_DIR"] = chosen
    if rank == 0 and not _announced and not _comm_op_built(chosen):  # the first run waits silently otherwise
        _announced = True
        where = "TORCH_EXTENSIONS_DIR" if given else "TORCH_EXTENSIONS_DIR is not set: this environment's own"
        log(f"DeepSpeed JIT-compiles its ops on first use, once per environment ({where}: {chosen}): about 25 s "
            "for its communication op, as long again for cpu_adam with --cpu-optimizer")
    return chosen


def _comm_op_built(extensions_dir: str) -> bool:
    """Whether DeepSpeed's shared-memory communication op is already built in `extensions_dir`."""
    return os.path.isfile(os.path.join(extensions_dir, "deepspeed_shm_comm", "deepspeed_shm_comm.so"))


def quiet_cpu_accelerator_probe() -> None:
    """Before DeepSpeed is imported, on a machine whose torch sees no accelerator (cuda, xpu, mps), tell it so:
    DS_ACCELERATOR=cpu, DeepSpeed's own variable. Otherwise its auto-detection warns "Setting accelerator to CPU.
    If you have GPU or other accelerator, we were unable to detect it." on every import (every tool call, --help
    included). A DS_ACCELERATOR the user set is kept."""
    if os.environ.get("DS_ACCELERATOR"):
        return
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available() or (xpu is not None and xpu.is_available()) or (mps is not None
                                                                               and mps.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


# ---- the assumptions, checked against the installed DeepSpeed -----------------------------------------------

_CHECKS: list[tuple[str, Callable[[], None]]] = []


def _assumption(what: str):
    def register(fn):
        _CHECKS.append((what, fn))
        return fn
    return register


def _require(condition: bool, detail: str) -> None:
    if not condition:
        raise AssertionError(detail)


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _source(fn) -> str:
    return inspect.getsource(fn)


@contextlib.contextmanager
def zero3_module_weights(provide: Callable[[str, Optional[str]], dict]) -> Iterator[None]:
    """At ZeRO-3 without optimizer states (load_optimizer_states=False or load_module_only), DeepSpeed 0.19.8's
    engine._load_checkpoint takes the module's weights from `get_fp32_state_dict_from_zero_checkpoint(load_dir)`
    (imported into deepspeed.runtime.engine): it follows the `latest` pointer, not the tag being loaded,
    merges one model-parallel rank only and reads every file again. For the length of the load,
    `provide(checkpoint_dir, tag)` answers instead (tag None: DeepSpeed passed none)."""
    import deepspeed.runtime.engine as ds_engine

    real = ds_engine.get_fp32_state_dict_from_zero_checkpoint

    def answer(checkpoint_dir, tag=None, *args, **kwargs):
        return provide(checkpoint_dir, tag)

    ds_engine.get_fp32_state_dict_from_zero_checkpoint = answer
    try:
        yield
    finally:
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = real


def set_optimizer_clip_grad(optimizer, clip: float) -> None:
    """Put --clip-grad back into DeepSpeed's ZeRO-1/2, ZeRO-3 and bf16 optimizers, which keep it as `clip_grad`
    and whose checkpoint load restores the saved value over it (checked against DeepSpeed 0.19.8). Other
    optimizers read the engine's config, which the load does not touch."""
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = clip


def _classes():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return dict(engine=DeepSpeedEngine, pipe_engine=PipelineEngine, pipe_module=PipelineModule,
                zero12=DeepSpeedZeroOptimizer, zero3=DeepSpeedZeroOptimizer_Stage3, bf16=BF16_Optimizer)


class _NameStandIn:
    """Just what DeepSpeed's naming methods read from an engine / pipeline module."""

    def __init__(self, mp_rank: int = 0, zero3: bool = False, bf16: bool = False):
        self.checkpoint_mp_rank = mp_rank
        self.zero_optimization_partition_weights = lambda: zero3
        self.bfloat16_enabled = lambda: bf16
        self.load_universal_checkpoint = lambda: False


@_assumption("file names: mp_rank_XX_model_states.pt and ZeRO-3's zero_pp_rank_D_mp_rank_XX_model_states.pt "
             "(DeepSpeedEngine._get_ckpt_name)")
def _check_model_states_names():
    engine = _classes()["engine"]
    for mp in (0, 7, 12):
        got = os.path.basename(engine._get_ckpt_name(_NameStandIn(mp), "/s", "t"))
        _require(got == model_states_name(mp) and MODEL_STATES_FILE.match(got) and
                 int(MODEL_STATES_FILE.match(got).group(1)) == mp,
                 f"DeepSpeed names mp rank {mp}'s file {got}, we expect {model_states_name(mp)}")
        for dp in (0, 3):
            got = os.path.basename(engine._get_ckpt_name(_NameStandIn(mp, zero3=True), "/s", "t",
                                                         pp_placeholder=str(dp)))
            m = ZERO3_MODEL_STATES_FILE.match(got)
            _require(got == zero3_model_states_name(dp, mp) and m and (int(m.group(1)), int(m.group(2))) == (dp, mp),
                     f"DeepSpeed names ZeRO-3 dp {dp} mp {mp}'s file {got}, we expect {zero3_model_states_name(dp, mp)}")
            _require(bool(DP0_MODEL_STATES_FILE.match(got)) == (dp == 0), f"DP0_MODEL_STATES_FILE misjudges {got}")


@_assumption("Ulysses under ZeRO: ZeRO-3's reduce-scatter averages over the sequence × data group without the sp "
             "correction its contiguous path and ZeRO-1/2 apply (ulysses_gradient_scale)")
def _check_ulysses_gradient_averaging():
    classes = _classes()
    zero3 = _source(classes["zero3"])

    def method(name: str) -> str:  # from the class's text: instrument_w_nvtx's wrapper keeps no __wrapped__
        match = re.search(rf"\n    def {name}\(.*?(?=\n    def |\Z)", zero3, re.S)
        _require(match is not None, f"ZeRO-3 has no method {name}")
        return match.group(0)

    scatter, contiguous = method("__avg_scatter_grads"), method("__avg_scatter_contiguous_grads")
    _require("sequence_parallel_size" not in scatter and "reduce_scatter_coalesced" in scatter,
             "ZeRO-3's __avg_scatter_grads now handles sequence parallelism: ulysses_gradient_scale must return 1")
    _require("sequence_parallel_size" in contiguous, "ZeRO-3's contiguous path no longer divides by (group / sp)")
    _require("not self.reduce_scatter" in zero3, "ZeRO-3 no longer picks its path by reduce_scatter")
    _require("sequence_parallel_size" in _source(classes["zero12"]), "ZeRO-1/2 no longer divide by (group / sp)")
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    convert = _source(DeepSpeedZeRoOffload._convert_to_zero_parameters)
    _require("get_data_parallel_group()" in convert and "is_zero_param" in convert,
             "ZeRO-3's parameter conversion changed (partition_zero3_parameters)")


@_assumption("file names: [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt (DeepSpeedEngine._get_rank_zero_ckpt_name)")
def _check_optim_states_names():
    from types import SimpleNamespace

    engine = _classes()["engine"]
    _require(_params(engine._get_rank_zero_ckpt_name) == ["self", "checkpoints_path", "tag", "mp_rank", "dp_rank",
                                                           "bf16_mode"], "its signature changed")
    for dp, mp, bf16 in ((0, 0, False), (3, 11, True)):
        stand_in = SimpleNamespace(_get_zero_ckpt_prefix=lambda *a, **k: engine._get_zero_ckpt_prefix(None, *a, **k))
        got = os.path.basename(engine._get_rank_zero_ckpt_name(stand_in, "/s", "t", mp, dp, bf16))
        m = OPTIM_STATES_FILE.match(got)
        _require(got == optim_states_name(dp, mp, bf16) and m and is_optim_states_file(got)
                 and (bool(m.group(1)), int(m.group(2)), int(m.group(3))) == (bf16, dp, mp),
                 f"DeepSpeed names dp {dp} mp {mp} bf16 {bf16}'s shard {got}, we expect {optim_states_name(dp, mp, bf16)}")


@_assumption("file names: layer_LL-model_TT-model_states.pt (PipelineModule.ckpt_layer_path on "
             "PipeModelDataParallelTopology)")
def _check_layer_names():
    from types import SimpleNamespace

    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    module = _classes()["pipe_module"]
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    for rank in range(topo.world_size()):
        coord = topo.get_coord(rank)
        stand_in = SimpleNamespace(_local_start=5, global_rank=rank, _grid=SimpleNamespace(_topo=topo))
        got = os.path.basename(module.ckpt_layer_path(stand_in, "/s/t", 3))
        m = LAYER_STATES_FILE.match(got)
        _require(got == layer_states_name(8, coord.model) and m and (int(m.group(1)), int(m.group(2))) == (8, coord.model),
                 f"DeepSpeed names layer 8 of tp rank {coord.model} {got}, we expect {layer_states_name(8, coord.model)}")


@_assumption("tags and pointer: save_checkpoint's default tag global_stepN and its `latest` file")
def _check_tag_and_latest():
    src = _source(_classes()["engine"].save_checkpoint)
    _require('f"global_step{self.global_steps}"' in src, "save_checkpoint no longer tags global_step{N}")
    _require("'latest'" in src or '"latest"' in src, f"save_checkpoint no longer writes a {LATEST_FILENAME!r} file")
    _require(GLOBAL_STEP_TAG.match(global_step_tag(42)).group(1) == "42", "GLOBAL_STEP_TAG does not parse our tag")


@_assumption("universal checkpoints: the latest_universal pointer and the zero/<param name>/ folders")
def _check_universal_names():
    from deepspeed.checkpoint import ds_to_universal
    from deepspeed.runtime import base_optimizer

    c = _classes()
    _require(f'"{LATEST_UNIVERSAL_FILENAME}"' in _source(c["engine"].load_checkpoint) and
             f"'{LATEST_UNIVERSAL_FILENAME}'" in inspect.getsource(ds_to_universal),
             f"DeepSpeed no longer names its universal pointer {LATEST_UNIVERSAL_FILENAME}")
    for module, joined in ((ds_to_universal, "args.output_folder"), (base_optimizer, "checkpoint_dir"),
                           (c["zero3"], "checkpoint_dir")):
        _require(f'os.path.join({joined}, "{UNIVERSAL_ZERO_DIR}")' in inspect.getsource(module),
                 f"{module.__name__} no longer reads or writes the {UNIVERSAL_ZERO_DIR}/ folder")


@_assumption("saving: every file DeepSpeed writes goes through engine.checkpoint_engine (save / makedirs) or "
             "engine._copy_recovery_script(save_path), which CheckpointIO wraps")
def _check_save_writes():
    import deepspeed

    c = _classes()
    engine, pipe_module = c["engine"], c["pipe_module"]
    _require(_params(engine._copy_recovery_script) == ["self", "save_path"], "_copy_recovery_script's signature changed")
    copy_src = _source(engine._copy_recovery_script)
    for script in RECOVERY_SCRIPTS:
        _require(f'"{script}"' in copy_src, f"_copy_recovery_script no longer copies {script}")
        _require(os.path.isfile(os.path.join(os.path.dirname(deepspeed.__file__), "utils", script)),
                 f"deepspeed/utils/{script} is missing")
    _require("self._copy_recovery_script(save_path)" in _source(engine._save_zero_checkpoint),
             "_save_zero_checkpoint no longer copies the recovery scripts through _copy_recovery_script")
    writes = re.compile(r"torch\.save\(|\bopen\(|copyfile\(|copytree\(|os\.makedirs\(|os\.replace\(")
    for fn, allowed in ((engine.save_checkpoint, {"open(", "copytree("}),  # `latest` (we pass save_latest=False)
                        (engine._save_checkpoint, set()), (engine._save_zero_checkpoint, set()),  # and NVMe offload
                        (engine._create_checkpoint_file, set()), (pipe_module.save_state_dict, set())):
        found = set(writes.findall(_source(fn)))
        _require(found <= allowed, f"{fn.__qualname__} writes files another way: {sorted(found - allowed)}")
    for fn in (engine._save_checkpoint, engine._save_zero_checkpoint, pipe_module.save_state_dict):
        _require("checkpoint_engine.save(" in _source(fn), f"{fn.__qualname__} no longer saves through checkpoint_engine")
    _require("self.checkpoint_engine.makedirs(" in _source(engine._create_checkpoint_file),
             "_create_checkpoint_file no longer creates the directory through checkpoint_engine")
    _require("self.checkpoint_engine = " in _source(engine.__init__) or
             "self.checkpoint_engine = " in inspect.getsource(engine), "DeepSpeedEngine has no checkpoint_engine")


@_assumption("ZeRO-3: _get_fp32_opt_state_partition(param, release_swap_buffers, optim_state_key) and "
             "_get_param_partition_rank(param)")
def _check_zero3_partitions():
    zero3 = _classes()["zero3"]
    _require(_params(zero3._get_fp32_opt_state_partition)[:4] ==
             ["self", "param", "release_swap_buffers", "optim_state_key"], "_get_fp32_opt_state_partition changed")
    _require(_params(zero3._get_param_partition_rank) == ["self", "param"], "_get_param_partition_rank changed")


@_assumption("flat fp32 partitions: single_partition_of_fp32_groups (ZeRO-1/2), fp32_groups_flat_partition "
             "(BF16_Optimizer), fp32_partitioned_groups_flat (ZeRO-3)")
def _check_flat_partitions():
    c = _classes()
    for cls_key, name in (("zero12", "DeepSpeedZeroOptimizer"), ("bf16", "BF16_Optimizer"),
                          ("zero3", "DeepSpeedZeroOptimizer_Stage3")):
        cls = c[cls_key]
        _require(cls.__name__ == name, f"{name} was renamed {cls.__name__}")
        _require(f"self.{FLAT_FP32_PARTITIONS[name]} = " in inspect.getsource(cls),
                 f"{name} no longer sets {FLAT_FP32_PARTITIONS[name]}")


@_assumption("ZeRO-1/2 and BF16_Optimizer: _hp_optimizer_states_linked and _lazy_init_hp_params_optimizer_state()")
def _check_hp_relink():
    c = _classes()
    for cls in (c["zero12"], c["bf16"]):
        _require(_params(cls._lazy_init_hp_params_optimizer_state) == ["self"],
                 f"{cls.__name__}._lazy_init_hp_params_optimizer_state changed")
        src = _source(cls._lazy_init_hp_params_optimizer_state)
        _require("if not self._hp_optimizer_states_linked" in src and "self._hp_optimizer_states_linked = True" in src,
                 f"{cls.__name__} no longer guards the relink with _hp_optimizer_states_linked")


@_assumption("param._hp_mapping: a tensor_fragment with param_group_index and hp_fragment_address.start/.numel")
def _check_hp_mapping():
    import dataclasses

    import importlib

    mixed_precision_linkage = importlib.import_module("deepspeed.utils.mixed_precision_linkage")
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")

    _require("lp_param._hp_mapping = " in inspect.getsource(mixed_precision_linkage),
             "link_hp_params no longer sets param._hp_mapping")
    fields = {f.name for f in dataclasses.fields(tensor_fragment.tensor_fragment)}
    _require({"param_group_index", "hp_fragment_address"} <= fields, f"tensor_fragment's fields are {sorted(fields)}")
    address = {f.name for f in dataclasses.fields(tensor_fragment.fragment_address)}
    _require({"start", "numel"} <= address, f"fragment_address's fields are {sorted(address)}")


@_assumption("PipelineModule._synchronize_tied_weights()")
def _check_tied_sync():
    _require(_params(_classes()["pipe_module"]._synchronize_tied_weights) == ["self"], "its signature changed")


@_assumption("PipelineModule.get_tied_weights_and_groups(); PipelineEngine._exec_reduce_tied_grads all-reduces "
             "a tied weight's .grad (bf16 optimizer aside) and skips it when None")
def _check_tied_grad_reduction():
    _require(_params(_classes()["pipe_module"].get_tied_weights_and_groups) == ["self"], "its signature changed")
    source = _source(_classes()["pipe_engine"]._exec_reduce_tied_grads)
    _require("get_tied_weights_and_groups()" in source and "if grad is not None" in source,
             "_exec_reduce_tied_grads no longer reads get_tied_weights_and_groups() or no longer skips a None .grad")


@_assumption("fp16 loss scale: cur_scale (ZeRO optimizers) or loss_scale_config.cur_scale (FP16_Optimizer)")
def _check_loss_scale():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig

    c = _classes()
    for cls in (c["zero12"], c["zero3"]):
        _require(isinstance(getattr(cls, "cur_scale", None), property), f"{cls.__name__}.cur_scale is gone")
    _require("self.loss_scale_config = " in inspect.getsource(FP16_Optimizer), "FP16_Optimizer.loss_scale_config is gone")
    _require("self.cur_scale = " in inspect.getsource(LossScaleConfig), "LossScaleConfig.cur_scale is gone")


@_assumption("ZeRO / BF16 optimizers: dp_process_group and param_names ({param: name}, read by the universal loader)")
def _check_optimizer_attributes():
    from deepspeed.runtime import base_optimizer

    c = _classes()
    for cls in (c["zero12"], c["zero3"], c["bf16"]):
        src = inspect.getsource(cls)
        _require("self.param_names = " in src, f"{cls.__name__} no longer sets param_names")
        _require("self.dp_process_group = " in src or "dp_process_group" in _source(cls.__init__),
                 f"{cls.__name__} no longer has dp_process_group")
    _require("self.param_names[lp]" in inspect.getsource(base_optimizer),
             "the universal loader no longer finds a parameter's folder as param_names[param]")


@_assumption("DeepSpeedEngine._take_model_step calls self.clip_fp32_gradients() (replaced without ZeRO)")
def _check_clip_hook():
    engine = _classes()["engine"]
    _require("self.clip_fp32_gradients()" in _source(engine._take_model_step), "_take_model_step no longer calls it")


@_assumption("PipelineEngine._INSTRUCTION_MAP: {instruction class: function}, looked up on the instance")
def _check_instruction_map():
    pipe = _classes()["pipe_engine"]
    instructions = getattr(pipe, "_INSTRUCTION_MAP", None)
    _require(isinstance(instructions, dict) and all(isinstance(k, type) for k in instructions),
             "PipelineEngine._INSTRUCTION_MAP is not a dict of instruction classes")
    names = {k.__name__ for k in instructions}
    _require({"LoadMicroBatch", "ForwardPass", "BackwardPass", "OptimizerStep"} <= names,
             f"its instructions are {sorted(names)}")
    _require("self._INSTRUCTION_MAP[" in _source(pipe._exec_schedule), "_exec_schedule no longer looks it up on self")


def assumptions() -> list[str]:
    """What this adapter assumes about DeepSpeed, one line each (the names check_assumptions reports)."""
    return [what for what, _ in _CHECKS]


@_assumption("wall-clock timers: engine.timers (SynchronizedWallClockTimer) printed through timers.log(names, ...), "
             "the dp reduction timed as bwd_allreduce_microstep")
def _check_timers():
    from deepspeed.utils import timer

    c = _classes()
    _require(timer.BACKWARD_REDUCE_MICRO_TIMER == BACKWARD_REDUCE_TIMER,
             f"the timer is now named {timer.BACKWARD_REDUCE_MICRO_TIMER!r}")
    _require(_params(timer.SynchronizedWallClockTimer.log)[:2] == ["self", "names"], "SynchronizedWallClockTimer.log changed")
    _require("self.timers = SynchronizedWallClockTimer()" in _source(c["engine"].__init__), "engine.timers changed")
    _require("self.timers.log(" in inspect.getsource(c["engine"]) and "self.timers.log(" in inspect.getsource(c["pipe_engine"]),
             "the engines no longer print through self.timers.log")


@_assumption("gradient all-reduce switches: enable_backward_allreduce (DeepSpeedEngine), "
             "pipeline_enable_backward_allreduce (PipelineEngine's ReduceGrads)")
def _check_allreduce_switches():
    c = _classes()
    _require("if self.enable_backward_allreduce" in _source(c["engine"].backward) or
             "self.enable_backward_allreduce and" in inspect.getsource(c["engine"]),
             "DeepSpeedEngine no longer reads enable_backward_allreduce")
    _require("if self.pipeline_enable_backward_allreduce" in _source(c["pipe_engine"]._exec_reduce_grads),
             "PipelineEngine's ReduceGrads no longer reads pipeline_enable_backward_allreduce")


@_assumption("ZeRO-3 without optimizer states: engine._load_checkpoint takes the module weights from "
             "deepspeed.runtime.engine.get_fp32_state_dict_from_zero_checkpoint")
def _check_zero3_module_weights():
    import deepspeed.runtime.engine as ds_engine

    _require(hasattr(ds_engine, "get_fp32_state_dict_from_zero_checkpoint"),
             "deepspeed.runtime.engine no longer imports get_fp32_state_dict_from_zero_checkpoint")
    _require("get_fp32_state_dict_from_zero_checkpoint(" in _source(_classes()["engine"]._load_checkpoint),
             "engine._load_checkpoint no longer calls get_fp32_state_dict_from_zero_checkpoint")


@_assumption("ZeRO-1/2, ZeRO-3 and bf16 optimizers clip by their clip_grad attribute, which a checkpoint load "
             "restores from the file (set_optimizer_clip_grad puts the run's back)")
def _check_clip_grad():
    c = _classes()
    for kind in ("zero12", "zero3", "bf16"):
        _require("self.clip_grad = clip_grad" in _source(c[kind].__init__), f"{kind} no longer keeps clip_grad")
    _require("self.clip_grad = checkpoint_clip_grad" in inspect.getsource(c["zero12"]),
             "ZeRO-1/2's load no longer restores clip_grad (the re-set may be unneeded)")


def check_assumptions(only: Optional[list[str]] = None) -> list[str]:
    """Every assumption above (or those named in `only`), checked against the installed DeepSpeed: a list of the
    broken ones, each naming this module and what no longer holds (empty when all hold)."""
    unknown = set(only or ()) - set(assumptions())
    if unknown:
        raise ValueError(f"no such assumption in {ADAPTER}: {sorted(unknown)}; see assumptions()")
    problems = []
    for what, check in _CHECKS:
        if only is not None and what not in only:
            continue
        try:
            check()
        except Exception as error:  # an AttributeError or a changed source counts as broken, naming the assumption
            problems.append(f"{ADAPTER}: DeepSpeed {deepspeed_version()} breaks the assumption '{what}' "
                            f"(checked against {CHECKED_VERSION}): {type(error).__name__}: {error}")
    return problems
