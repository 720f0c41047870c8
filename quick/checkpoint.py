"""Quantized checkpoints: save (sharded safetensors, atomically) and load (QUICK or unmodified AutoAWQ GEMM).

Format: a Hugging Face style directory -- ``config.json`` with a ``quantization_config``, safetensors
shards ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, the tokenizer and the
generation config. Each packed linear ``name`` stores its layout's tensors as ``name.qweight`` etc.
(``qweight/scales/zeros`` for the QUICK layouts; ``qweight/qzeros/scales`` for AutoAWQ's GEMM format,
written with ``quant_method: "awq", version: "gemm"`` so AutoAWQ and transformers read it too).

Loading builds the model skeleton from the config without allocating weights, swaps in ``QuickLinear``
where the files hold ``qweight``, checks every tensor's shape and dtype against the skeleton or the
layout (errors name the tensor and the file), and repacks AutoAWQ tensors into the device's preferred
layout exactly (no requantization).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quick.external import ExternalFormatError, build_linear, detect_format, importer_for
from quick.formats.layouts import LAYOUTS, LayoutError, convert, get_layout
from quick.formats.weights import QuantizationError, QuantizedWeight
from quick.integrations.load_guard import add_load_guard
from quick.models.moe import (
    PerExpertCheckpoint,
    checkpoint_rename,
    experts_from_quantized,
    load_stack_,
    per_expert_checkpoints,
    per_expert_layout,
    per_expert_tensors,
    skeleton_experts,
)
from quick.nn.dtypes import set_compute_dtype
from quick.nn.linear import QuickLinear
from quick.nn.linear_w4a8 import UNPACKED, QuickLinearW4A8, preferred_w4a8_layout, w4a8_layouts
from quick.nn.moe import QuickExpertStack

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHECKSUM_KEY = "sha256"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
AWQ_VERSIONS = {"gemm": "awq_gemm"}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not match its config."""


def preferred_layout(device: torch.device | str | None = None) -> str:
    """Fastest layout for ``device``: 'quick_sm90' (wgmma, register-A weights) on Hopper when its kernel can be
    built there, else 'quick' (mma.sync, every GPU from sm_80). On CPU the reference path reads any layout.
    Repacking between them is exact (unpack, then pack), so checkpoints stay portable."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            from quick.kernels import wgmma

            if wgmma.is_available(device):
                return "quick_sm90"
        except Exception:  # noqa: BLE001 - an unusable optional kernel means the portable layout
            pass
    return "quick"


# ------------------------------------------------------------------------------------ quantization config


def layout_for_config(qc: dict[str, Any]) -> str:
    """Packed layout named by a ``quantization_config`` (``awq``/``gemm`` -> ``awq_gemm``)."""
    method = str(qc.get("quant_method", "")).lower()
    version = str(qc.get("version", "")).lower()
    if qc.get("bits", qc.get("w_bit", 4)) != 4:
        raise CheckpointError(f"only 4-bit checkpoints are supported, got bits={qc.get('bits')}")
    if method == "awq":
        if version not in AWQ_VERSIONS:
            raise CheckpointError(
                f"AutoAWQ version '{qc.get('version')}' is not supported; only 'gemm' checkpoints can be loaded "
                "(GEMV/Marlin/ExLlama formats pack weights differently)"
            )
        return AWQ_VERSIONS[version]
    if method == "quick":
        if version not in LAYOUTS:
            raise CheckpointError(f"unknown QUICK layout '{qc.get('version')}'; known: {sorted(LAYOUTS)}")
        return version
    raise CheckpointError(f"quant_method '{qc.get('quant_method')}' is not 'quick' or 'awq'")


def make_quant_config(
    layout: str, group_size: int, zero_point: bool = True, modules_to_not_convert: Iterable[str] = ("lm_head",)
) -> dict[str, Any]:
    """The ``quantization_config`` written to ``config.json`` for ``layout``."""
    get_layout(layout)
    if layout == "awq_gemm":
        method, version = "awq", "gemm"
    else:
        method, version = "quick", layout
    return {
        "quant_method": method,
        "bits": 4,
        "group_size": group_size,
        "zero_point": bool(zero_point),
        "version": version,
        "modules_to_not_convert": list(modules_to_not_convert),
    }


def packed_modules(model: nn.Module) -> dict[str, QuickLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuickLinear)}


def expert_stacks(model: nn.Module) -> dict[str, QuickExpertStack]:
    """The packed expert stacks of mixture-of-experts blocks (``<experts>.gate_up``, ``<experts>.down``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuickExpertStack)}


# ------------------------------------------------------------------------------------------------- save


# Layouts of other libraries, whose readers expect mixture-of-experts weights one linear per expert.
PER_EXPERT_LAYOUTS = ("awq_gemm",)


def _state_for_save(model: nn.Module, layout: str, dense_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors to write: packed layers in ``layout`` (repacked if needed), dense floats in ``dense_dtype``,
    tied duplicates (``lm_head`` sharing the embedding) written once."""
    packed = packed_modules(model)
    out: dict[str, torch.Tensor] = {}
    for name, mod in packed.items():
        tensors = mod.packed()
        if mod.layout_name != layout:
            tensors = convert(tensors, mod.layout_name, layout, mod.in_features, mod.out_features, mod.group_size)
        for t_name, t in tensors.items():
            out[f"{name}.{t_name}"] = t
        if mod.bias is not None:
            out[f"{name}.bias"] = mod.bias
        if mod.perm is not None:
            out[f"{name}.perm"] = mod.perm
    stacks = expert_stacks(model)
    rename = None
    if layout in PER_EXPERT_LAYOUTS:  # other libraries' format: one linear per expert, the published names
        for tensors in per_expert_tensors(model, layout).values():
            out.update(tensors)
        rename = checkpoint_rename(getattr(model, "config", None), to_published=True)
    else:
        for name, st in stacks.items():
            out.update({f"{name}.{t_name}": t for t_name, t in st.tensors_in(layout).items()})
    _add_dense_state(model, set(packed) | set(stacks), dense_dtype, out)
    if rename is not None:
        out = {rename(k): v for k, v in out.items()}
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _add_dense_state(model: nn.Module, packed: set[str], dense_dtype: torch.dtype, out: dict) -> None:
    """Add every tensor outside the ``packed`` modules to ``out`` in ``dense_dtype``, tied ones once."""
    seen_ptrs: set[tuple[int, int]] = set()
    for key, t in model.state_dict(keep_vars=False).items():
        prefix = key.rpartition(".")[0]
        if prefix in packed:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen_ptrs:
            continue
        seen_ptrs.add(ptr)
        out[key] = t.to(dense_dtype) if t.is_floating_point() else t


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _make_readable(root: Path) -> None:
    """Files 0644, directories 0755: a checkpoint is shared data (mkdtemp makes 0700, some writers 0600)."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def verify_checksums(path: str | os.PathLike) -> int:
    """Check every shard against the SHA-256 recorded in the index at save; returns how many were checked (0 for
    checkpoints written without checksums, e.g. by other libraries). Raises :class:`CheckpointError` naming the
    first shard whose bytes changed."""
    index = Path(path) / INDEX_NAME
    if not index.exists():
        return 0
    try:
        digests = (json.loads(index.read_text()).get("metadata") or {}).get(CHECKSUM_KEY)
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({e})") from None
    if digests is None:
        return 0
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise CheckpointError(f"{index}: metadata.{CHECKSUM_KEY} must map shard names to hex digests")
    for fname, want in digests.items():
        f = Path(path) / fname
        if Path(fname).name != fname or not f.is_file():
            raise CheckpointError(f"{index}: checksum listed for {fname!r}, which is not a file of the checkpoint")
        got = _sha256(f)
        if got != want:
            raise CheckpointError(
                f"{f}: SHA-256 {got[:16]}... does not match {want[:16]}... recorded at save; the shard is corrupt "
                "(re-download or re-save it; pass verify=False / --no-verify only for files you trust)"
            )
    return len(digests)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# A processor's own files beside the tokenizer's: image / video preprocessing of vision-language models.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")  # fmt: skip


def processor_files(source: str | os.PathLike | None) -> list[Path]:
    """The :data:`PROCESSOR_FILES` a source checkpoint directory holds (a quantized copy carries them along)."""
    if source is None or not Path(source).is_dir():
        return []
    return [Path(source) / f for f in PROCESSOR_FILES if (Path(source) / f).is_file()]


def save_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike,
    quant_config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    _before_publish: Any = None,
    extra_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` (with ``QuickLinear`` layers) to ``out_dir``; returns the directory.

    ``quant_config``: a ``quantization_config`` dict (see :func:`make_quant_config`); its layout decides
    how packed tensors are written (repacked exactly if the modules use another one); default: the
    modules' own layout. ``extra_files`` are copied in as they are (a vision-language model's processor files,
    :func:`processor_files`). Everything is written into a temporary directory next to ``out_dir`` and renamed
    into place only when complete, so an interrupted save leaves no checkpoint at ``out_dir`` (an existing
    one is replaced only after the new one is fully written).
    """
    from quick.models.fuse import unfuse_needed, unfused

    if unfuse_needed(model):  # fused q/k/v, gate/up: the checkpoint holds the model's own linears
        with unfused(model):
            return save_quantized(model, out_dir, quant_config, tokenizer, max_shard_size, _before_publish, extra_files)
    out = Path(out_dir).resolve()
    if w4a8_modules(model):
        qc, tensors, dense_dtype = _w4a8_state_for_save(model, quant_config)
        return _write_checkpoint(
            model, out, tensors, qc, dense_dtype, tokenizer, max_shard_size, _before_publish, extra_files
        )
    packed = packed_modules(model)
    if not packed:
        raise CheckpointError("model has no QuickLinear layers; quantize it before save_quantized")
    first = next(iter(packed.values()))
    sizes = [m.group_size for m in packed.values()]
    common = max(set(sizes), key=sizes.count)
    qc = dict(quant_config) if quant_config else make_quant_config(first.layout_name, common)
    layout = layout_for_config(qc)
    # Layers quantized with another group size than the nominal one (e.g. a fallback for K not divisible
    # by it) are listed by name, so that loading stays strict about every other layer's shapes.
    stacks = expert_stacks(model)
    overrides = {n: m.group_size for n, m in {**packed, **stacks}.items() if m.group_size != qc.get("group_size")}
    if overrides:
        if layout == "awq_gemm":
            raise CheckpointError(
                f"AutoAWQ's format has one group size; {len(overrides)} layers (e.g. {next(iter(overrides))}) "
                f"use another than {qc.get('group_size')}"
            )
        qc["module_group_sizes"] = overrides
    if layout == "awq_gemm":
        permuted = [n for n, m in packed.items() if m.perm is not None]
        if permuted:
            raise CheckpointError(
                f"AutoAWQ's format has no input permutation: {len(permuted)} layers (e.g. {permuted[0]}) come from an "
                "act-order checkpoint; save them in a QUICK layout instead"
            )
        ragged = [n for n, m in {**packed, **stacks}.items() if m.logical_in_features != m.in_features]
        if ragged:
            raise CheckpointError(
                f"AutoAWQ's format cannot hold a ragged last group: {len(ragged)} layers (e.g. {ragged[0]}) have K "
                f"not divisible by the group size; save them in a QUICK layout instead"
            )
    dtypes = {m.dtype for m in (*packed.values(), *stacks.values())}
    if len(dtypes) != 1:
        raise CheckpointError(f"packed layers use several dtypes {sorted(map(str, dtypes))}; one is supported")
    dense_dtype = first.dtype
    tensors = _state_for_save(model, layout, dense_dtype)
    return _write_checkpoint(
        model, out, tensors, qc, dense_dtype, tokenizer, max_shard_size, _before_publish, extra_files
    )


def _write_checkpoint(
    model: nn.Module,
    out: Path,
    tensors: dict[str, torch.Tensor],
    qc: dict[str, Any],
    dense_dtype: torch.dtype,
    tokenizer: Any,
    max_shard_size: int,
    _before_publish: Any,
    extra_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write shards, index, config (with ``qc``), generation config, tokenizer and ``extra_files`` to a temp dir,
    then publish."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = _shards(tensors, max_shard_size)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        digests = {f: _sha256(tmp / f) for f in sorted(set(weight_map.values()))}
        index = {
            "metadata": {"total_size": total, CHECKSUM_KEY: digests},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        config = copy.deepcopy(model.config)
        config.quantization_config = qc
        config.dtype = dense_dtype
        config.save_pretrained(tmp)
        add_load_guard(tmp)  # plain transformers must refuse a QUICK checkpoint, not load random weights
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # a generation config is a convenience, not part of the weights
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in map(Path, extra_files):
            if not (tmp / f.name).exists():  # what the model and tokenizer wrote is theirs
                shutil.copyfile(f, tmp / f.name)
        _make_readable(tmp)
        _fsync_tree(tmp)
        if _before_publish is not None:
            _before_publish(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp directory to ``out``, replacing an existing directory only at the end."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- load


def _read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the file holds every byte the header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})"
                )
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header ({e}); the file is corrupt") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path}: file is {size} bytes but its header describes {8 + n + end}; the file is truncated or corrupt"
        )
    return header


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index when there is one."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: corrupt index (weight_map must map tensor names to file names)")
        bad = [v for v in set(weight_map.values()) if Path(v).name != v or v in (".", "..")]
        if bad:
            raise CheckpointError(f"{index}: weight_map names {bad[0]!r}, not a file inside the checkpoint directory")
        return {k: path / v for k, v in weight_map.items()}
    single = path / SINGLE_NAME
    if single.exists():
        return {k: single for k in _read_header(single)}
    raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME}")


def read_quant_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization_config`` of a checkpoint directory, or ``None`` for a dense one."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: no config.json")
    try:
        raw = json.loads(cfg.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{cfg}: corrupt config.json ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg}: config.json must hold a JSON object, got {type(raw).__name__}")
    qc = raw.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{cfg}: quantization_config must be a JSON object, got {type(qc).__name__}")
    return qc


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").exists() and read_quant_config(p) is not None


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    prefix, _, name = key.rpartition(".")
    mod = model.get_submodule(prefix) if prefix else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[name] = t


def _load_dense(model: nn.Module, key: str, t: torch.Tensor, ref: torch.Tensor, f: Path, dense_dtype) -> None:
    """Set a dense tensor after checking it against the skeleton's (errors name the tensor and the file)."""
    if tuple(t.shape) != tuple(ref.shape):
        raise CheckpointError(
            f"tensor '{key}' in {f.name} has shape {tuple(t.shape)}, the model needs {tuple(ref.shape)}"
        )
    if ref.is_floating_point() != t.is_floating_point():
        raise CheckpointError(f"tensor '{key}' in {f.name} has dtype {t.dtype}, expected {ref.dtype}")
    _set_tensor(model, key, t.to(dense_dtype) if t.is_floating_point() else t.to(ref.dtype))


def _check_values(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Values no quantizer writes: non-finite scales, zero points outside [0, 15] or not integers. Every bit
    pattern of packed codes is valid, so corruption there cannot be seen; in scales and zeros it can."""
    for tname, t in tensors.items():
        if tname == "scales" and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor '{name}.scales' holds NaN or inf; the checkpoint is corrupt")
        if tname == "zeros" and t.is_floating_point() and t.numel():
            z = t.float()
            if not torch.equal(z, z.round()) or float(z.min()) < 0 or float(z.max()) > 15:
                raise CheckpointError(f"tensor '{name}.zeros' holds values that are not zero points in [0, 15]")


class _RenamedFile:
    """A safetensors handle whose keys read under the model's names (``rename``: file key -> model key)."""

    def __init__(self, sf: Any, rename: Callable[[str], str]) -> None:
        self._sf = sf
        self._orig = {rename(k): k for k in sf.keys()}

    def keys(self) -> list[str]:
        return list(self._orig)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._sf.get_tensor(self._orig[key])


def _renamed_meta(
    headers: dict[Path, Any], rename: Callable[[str], str] | None
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """``(where, meta)``: file and header entry of every tensor, under the model's names; two tensors that map to
    one name are an error."""
    where: dict[str, Path] = {}
    meta: dict[str, dict[str, Any]] = {}
    for f, h in headers.items():
        for k, v in h.items():
            name = rename(k) if rename else k
            if name in meta:
                raise CheckpointError(f"tensor '{k}' in {f.name} names '{name}', which {where[name].name} holds too")
            where[name] = f
            meta[name] = v
    return where, meta


def _read_tensors(
    headers: dict[Path, Any], model: nn.Module, dense_dtype: torch.dtype, claim: Callable[[Path, str, Any], bool],
    rename: Callable[[str], str] | None = None,
) -> None:  # fmt: skip
    """Read every tensor of the checkpoint files ``headers``: ``claim(file, key, safe_open handle)`` takes those of
    the quantized layers (True when it did); the others are set into the dense skeleton ``model`` (checked against
    it) or, when the model has no such tensor, ignored with a warning. ``rename``: file key -> model key (keys and
    the handle's ``get_tensor`` then use the model's names). Unreadable files raise CheckpointError."""
    expected = dict(model.state_dict(keep_vars=True))
    unexpected = []
    for f in headers:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                sf = _RenamedFile(handle, rename) if rename else handle
                for key in sf.keys():
                    if claim(f, key, sf):
                        continue
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    _load_dense(model, key, sf.get_tensor(key), expected[key], f, dense_dtype)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{f}: cannot read tensors ({type(e).__name__}: {e}); the file is corrupt") from None
    if unexpected:
        log.warning("ignoring %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])


def _check_orphans(meta: dict[str, Any], suffix: str, layers: dict[str, nn.Module], config: Any) -> None:
    """Every ``<name><suffix>`` tensor of the checkpoint belongs to one of the quantized ``layers``."""
    orphans = [k for k in meta if k.endswith(suffix) and k.rpartition(".")[0] not in layers]
    if orphans:
        raise CheckpointError(f"'{orphans[0]}' does not belong to any nn.Linear of the {config.model_type} model")


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _finish(model: nn.Module, path: Any, dense_dtype: torch.dtype, device: torch.device | str | None) -> None:
    """Tie the weights, check that no tensor stayed on the meta device, cast the dense parts and move to ``device``
    (eval mode)."""
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    set_compute_dtype(model, dense_dtype)
    model.to(device)
    model.eval()


def _model_config(path: Path) -> Any:
    """The checkpoint's transformers config without its ``quantization_config`` (the loader builds a dense
    skeleton from it); an unreadable one is a CheckpointError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, missing fields
        raise CheckpointError(f"{path}: config.json does not describe a model transformers can build ({e})") from None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _skeleton(config: Any, dense_dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights

    from quick.models.loading import generation_class

    with init_empty_weights(include_buffers=False):
        return generation_class(config).from_config(config, dtype=dense_dtype)


@torch.no_grad()
def load_quantized(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    layout: str | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a 4-bit checkpoint as a transformers model with ``QuickLinear`` layers: QUICK, AutoAWQ GEMM,
    compressed-tensors ``pack-quantized`` W4A16 or GPTQ (the format is read from ``quantization_config``).

    ``dtype``: compute dtype of the dense parts (default: the stored scale dtype); packed layers keep the
    stored scale dtype and cast activations at their boundary when the two differ. ``layout``: repack
    into this layout (default: the stored one for QUICK checkpoints, :func:`preferred_layout` otherwise).
    ``verify``: check each shard against the SHA-256 recorded at save (QUICK checkpoints; about a second per
    GB); ``False`` skips it for trusted files.
    """

    path = Path(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    qc = read_quant_config(path)
    if qc is None:
        raise CheckpointError(f"{path}: config.json has no quantization_config (a dense model?)")
    try:
        fmt = detect_format(qc)
    except ExternalFormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if verify:
        verify_checksums(path)
    if fmt in ("compressed-tensors", "gptq"):
        return _load_external(path, qc, device, dtype, layout)
    if is_w4a8_config(qc):
        if layout is not None and layout not in w4a8_layouts():
            raise CheckpointError(
                f"{path}: a W4A8 checkpoint cannot be repacked into the W4A16 layout '{layout}' "
                f"(W4A8 layouts: {sorted(w4a8_layouts())})"
            )
        return _load_w4a8(path, qc, device, dtype, layout)
    src_layout = layout_for_config(qc)
    # Without an explicit layout, repack to the fastest one for the device; a layer whose shape that layout
    # cannot hold (e.g. N % 64 for quick_sm90) keeps the portable 'quick' layout.
    dst_layout = layout or preferred_layout(device)
    get_layout(dst_layout)
    try:
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{path}: group_size {qc.get('group_size')!r} in quantization_config is not an integer"
        ) from None
    overrides = qc.get("module_group_sizes") or {}
    if not isinstance(overrides, dict):
        raise CheckpointError(f"{path}: module_group_sizes must be a JSON object, got {type(overrides).__name__}")

    files = _weight_files(path)
    headers = {f: _read_header(f) for f in sorted(set(files.values()))}
    held = {k for h in headers.values() for k in h}
    for k, f in files.items():
        if k not in held:
            raise CheckpointError(f"tensor '{k}' is listed in the index for {f.name} but that file does not hold it")

    config = _model_config(path)
    rename = checkpoint_rename(config)
    where, meta = _renamed_meta(headers, rename)
    scale_dtypes = {_ST_DTYPES.get(meta[k]["dtype"]) for k in meta if k.endswith(".scales")}
    if not scale_dtypes:
        raise CheckpointError(f"{path}: no '.scales' tensors; not a quantized checkpoint")
    if len(scale_dtypes) != 1 or None in scale_dtypes:
        raise CheckpointError(f"{path}: scales have mixed or unsupported dtypes {scale_dtypes}")
    scale_dtype = scale_dtypes.pop()
    if scale_dtype not in (torch.float16, torch.bfloat16):
        raise CheckpointError(f"{path}: scales are {scale_dtype}; QUICK checkpoints store float16 or bfloat16 scales")
    dense_dtype = dtype or scale_dtype
    model = _skeleton(config, dense_dtype)

    quantized: dict[str, QuickLinear] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and f"{name}.qweight" in meta:
            k = m.in_features
            g = int(overrides.get(name, group_size))
            rows = meta.get(f"{name}.scales", {}).get("shape", [0])[0]
            bias = f"{name}.bias" in meta
            try:
                if g != -1 and k % g and rows == -(-k // g):
                    # ragged last group, stored zero-padded to whole groups (QuickLinear.logical_in_features)
                    q = QuickLinear(
                        rows * g, m.out_features, bias, g, dst_layout, scale_dtype, "meta", logical_in_features=k
                    )
                else:
                    lay = dst_layout
                    if layout is None and dst_layout != "quick":
                        try:
                            get_layout(dst_layout).check(k, m.out_features, g)
                        except (LayoutError, QuantizationError):
                            lay = "quick"
                    q = QuickLinear(k, m.out_features, bias, g, lay, scale_dtype, "meta")
            except (LayoutError, QuantizationError) as e:
                raise CheckpointError(f"{path}: cannot hold '{name}' (scales {rows} rows): {e}") from None
            _replace_module(model, name, q)
            quantized[name] = q
    try:  # mixture-of-experts blocks: fused experts modules become QuickMoEExperts where the files hold stacks
        stacks = skeleton_experts(
            model, meta, lambda n: overrides.get(f"{n}.gate_up", group_size), layout, dst_layout, scale_dtype
        )
        experts = per_expert_checkpoints(model, meta.__contains__, ".qweight")  # AutoAWQ's MoE checkpoints
    except (ValueError, QuantizationError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    expert_linears = {p: ck for ck in experts.values() for p in ck.linears()}
    _check_orphans(meta, ".qweight", {**quantized, **stacks, **expert_linears}, config)

    src_names = set(get_layout(src_layout).tensor_specs(128, 128, 128))
    pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in (*quantized, *stacks, *expert_linears)}

    def claim(f: Path, key: str, sf: Any) -> bool:
        prefix, _, tname = key.rpartition(".")
        if (prefix in quantized or prefix in stacks or prefix in expert_linears) and tname in src_names:
            pending[prefix][tname] = sf.get_tensor(key)
            return True
        if prefix in expert_linears and tname == "bias":
            raise CheckpointError(f"tensor '{key}' in {f.name}: expert linears with a bias are not supported")
        if prefix in quantized and tname == "perm":
            p = sf.get_tensor(key)
            q = quantized[prefix]
            n = q.logical_in_features
            if p.dtype != torch.int64 or tuple(p.shape) != (n,) or not torch.equal(p.sort().values, torch.arange(n)):
                raise CheckpointError(f"tensor '{key}' in {f.name} is not a permutation of the {n} inputs")
            q.perm = p
            return True
        if prefix in quantized and tname == "bias":
            b = sf.get_tensor(key)
            q = quantized[prefix]
            if tuple(b.shape) != (q.out_features,):
                raise CheckpointError(
                    f"tensor '{key}' in {f.name} has shape {tuple(b.shape)}, expected ({q.out_features},)"
                )
            q.register_buffer("bias", b.to(q.dtype))
            return True
        return False

    _read_tensors(headers, model, dense_dtype, claim, rename)

    src = get_layout(src_layout)
    for name, q in quantized.items():
        tensors = pending[name]
        try:
            g = q.group_size
            src.validate(tensors, q.in_features, q.out_features, g, where=name)
            _check_values(tensors, name)
            if src_layout != dst_layout:
                tensors = convert(tensors, src_layout, dst_layout, q.in_features, q.out_features, g)
            get_layout(dst_layout).validate(tensors, q.in_features, q.out_features, g, where=name)
        except LayoutError as e:
            raise CheckpointError(f"{where.get(name + '.qweight', path)}: {e}") from None
        for tname, t in tensors.items():
            q.register_buffer(tname, t.contiguous())
        if q.bias is not None and q.bias.is_meta:
            raise CheckpointError(f"missing tensor '{name}.bias'")
    for name, st in stacks.items():
        try:
            _check_values(pending[name], name)
            load_stack_(st, pending[name], src_layout, name)
        except (LayoutError, QuantizationError) as e:
            raise CheckpointError(f"{where.get(name + '.qweight', path)}: {e}") from None
    for name, ck in _progress(experts):
        g = int(overrides.get(ck.prefixes[0][0], group_size))

        def unpack(prefix: str, k: int, n: int, lay: str, g: int = g) -> QuantizedWeight:
            tensors = pending.pop(prefix)
            src.validate(tensors, k, n, g, where=prefix)
            _check_values(tensors, prefix)
            qw = src.unpack(tensors, k, n, g)
            return build_linear(prefix, qw.q, qw.scales, qw.zeros, g, lay, qw.scales.dtype).qw  # K padded for lay

        try:
            _replace_module(model, name, _experts_from_files(ck, unpack, dst_layout, g, layout is not None))
        except (LayoutError, QuantizationError, ExternalFormatError) as e:
            raise CheckpointError(f"{path}: {e}") from None

    _finish(model, path, dense_dtype, device)
    saved = dict(qc)
    model.quick_quant_config = make_quant_config(
        dst_layout, group_size, qc.get("zero_point", True), qc.get("modules_to_not_convert") or ("lm_head",)
    )
    model.quick_source_quant_config = saved
    return model


def _progress(experts: dict[str, PerExpertCheckpoint]) -> Iterable[tuple[str, PerExpertCheckpoint]]:
    """The per-expert blocks with a bar on a terminal (a large MoE model repacks for a minute or two on the CPU)."""
    from tqdm.auto import tqdm

    return tqdm(experts.items(), desc="packing experts", unit="block", disable=None, leave=False)


def _experts_from_files(
    ck: PerExpertCheckpoint, unpack: Callable[[str, int, int, str], QuantizedWeight], layout: str, group_size: int,
    explicit: bool,
) -> nn.Module:  # fmt: skip
    """A per-expert checkpoint's experts as one :class:`QuickMoEExperts`: ``unpack(prefix, K, N, layout)`` gives one
    linear's weight with K padded for ``layout`` (the stacks' layout: ``layout`` where it holds them, else 'quick'
    unless asked for)."""
    lay = per_expert_layout(ck, layout, group_size, explicit)
    h, i = ck.hidden_size, ck.intermediate_size
    gate = [unpack(trip[0], h, i, lay) for trip in ck.prefixes]
    up = [unpack(trip[1], h, i, lay) for trip in ck.prefixes]
    down = [unpack(trip[2], i, h, lay) for trip in ck.prefixes]
    return experts_from_quantized(ck, gate, up, down, lay)


# ------------------------------------------------------------------------- other libraries' checkpoints


def _config_dtype(config: Any) -> torch.dtype | None:
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    return stored if stored in (torch.float16, torch.bfloat16) else None


@torch.no_grad()
def _load_external(
    path: Path, qc: dict[str, Any], device: torch.device, dtype: torch.dtype | None, layout: str | None
) -> nn.Module:
    """compressed-tensors / GPTQ: every linear whose files hold the format's marker tensor is unpacked by the
    format's importer (:mod:`quick.external`) and packed into ``layout`` (default: the fastest for ``device``,
    'quick' for a layer that layout cannot hold); the other linears stay dense."""
    try:
        imp = importer_for(qc)
    except ExternalFormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    dst_layout = layout or preferred_layout(device)
    get_layout(dst_layout)
    files = _weight_files(path)
    headers = {f: _read_header(f) for f in sorted(set(files.values()))}
    config = _model_config(path)
    rename = checkpoint_rename(config)
    where, meta = _renamed_meta(headers, rename)
    scale_keys = [k for k in meta if k.endswith("." + imp.scale_name) and k.rpartition(".")[0] + imp.marker in meta]
    if not scale_keys:
        raise CheckpointError(f"{path}: no '{imp.marker}' / '.{imp.scale_name}' tensors; no quantized layer found")
    stored_scale = {_ST_DTYPES.get(meta[k]["dtype"]) for k in scale_keys}
    if len(stored_scale) != 1:
        raise CheckpointError(f"{path}: scales have mixed dtypes {sorted(map(str, stored_scale))}")
    fallback = _config_dtype(config) or torch.bfloat16
    scale_dtype = stored_scale.pop()
    scale_dtype = scale_dtype if scale_dtype in (torch.float16, torch.bfloat16) else fallback
    dense_dtype = dtype or _config_dtype(config) or scale_dtype
    model = _skeleton(config, dense_dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}{imp.marker}" in meta}
    try:  # mixture-of-experts blocks whose experts the files store one linear at a time
        experts = per_expert_checkpoints(model, meta.__contains__, imp.marker)
    except (ValueError, QuantizationError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    expert_linears = {p: ck for ck in experts.values() for p in ck.linears()}
    _check_orphans(meta, imp.marker, {**linears, **expert_linears}, config)
    pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in (*linears, *expert_linears)}

    def claim(f: Path, key: str, sf: Any) -> bool:
        prefix, _, tname = key.rpartition(".")
        if (prefix in linears or prefix in expert_linears) and (tname in imp.tensor_names or tname == "bias"):
            pending[prefix][tname] = sf.get_tensor(key)
            return True
        return False

    _read_tensors(headers, model, dense_dtype, claim, rename)
    for name, lin in linears.items():
        tensors = pending[name]
        bias = tensors.pop("bias", None)
        if (lin.bias is not None) != (bias is not None):
            raise CheckpointError(f"{path}: layer '{name}': bias {'missing' if bias is None else 'unexpected'}")
        if bias is not None and tuple(bias.shape) != (lin.out_features,):
            raise CheckpointError(f"{path}: '{name}.bias' is {tuple(bias.shape)}, expected ({lin.out_features},)")
        lays = [dst_layout] if layout is not None or dst_layout == "quick" else [dst_layout, "quick"]
        for i, lay in enumerate(lays):
            try:
                imported = imp.convert(name, tensors, lin.in_features, lin.out_features, lay, scale_dtype)
                mod = QuickLinear.from_quantized(imported.qw, bias, lay, imported.logical_in_features)
                break
            except (LayoutError, QuantizationError) as e:
                if i + 1 == len(lays):
                    raise CheckpointError(f"{where[name + imp.marker]}: layer '{name}': {e}") from None
            except ExternalFormatError as e:
                raise CheckpointError(f"{where[name + imp.marker]}: {e}") from None
        if imported.perm is not None:
            mod.perm = imported.perm
        _replace_module(model, name, mod)

    def unpack(prefix: str, k: int, n: int, lay: str) -> QuantizedWeight:
        tensors = pending.pop(prefix)
        if "bias" in tensors:
            raise ExternalFormatError(f"'{prefix}.bias': expert linears with a bias are not supported")
        imported = imp.convert(prefix, tensors, k, n, lay, scale_dtype)
        if imported.perm is not None:
            raise ExternalFormatError(
                f"'{prefix}': act-order (desc_act) gives each expert its own input order, which the grouped expert "
                "kernels cannot apply; quantize the experts without act-order"
            )
        return imported.qw

    for name, ck in _progress(experts):
        try:
            _replace_module(
                model, name, _experts_from_files(ck, unpack, dst_layout, imp.group_size, layout is not None)
            )
        except (LayoutError, QuantizationError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        except ExternalFormatError as e:
            raise CheckpointError(f"{where[ck.prefixes[0][0] + imp.marker]}: {e}") from None
    _finish(model, path, dense_dtype, device)
    skip = list(qc.get("ignore") or ()) or ["lm_head"]
    model.quick_quant_config = make_quant_config(dst_layout, imp.group_size, not imp.symmetric, skip)
    model.quick_source_quant_config = dict(qc)
    model.quick_source_format = imp.describe()
    return model


# ------------------------------------------------------------------------------------------ W4A8 (QQQ)

W4A8_VERSION = "w4a8"


def is_w4a8_config(qc: dict[str, Any]) -> bool:
    """A ``quantization_config`` of W4A8 weights (QQQ format, :mod:`quick.formats.w4a8`)."""
    return str(qc.get("version", "")).lower() == W4A8_VERSION or int(qc.get("a_bit", 16)) == 8


def make_w4a8_quant_config(
    group_size: int,
    method: str = "qqq",
    storage: str = "w4a8",
    modules_to_not_convert: Iterable[str] = ("lm_head",),
) -> dict[str, Any]:
    """The ``quantization_config`` of a W4A8 checkpoint: 4-bit symmetric weights, per-token int8 activations.

    ``storage``: a W4A8 layout of :mod:`quick.formats.layouts` (``w4a8``, ``w4a8_sm90``) or ``unpacked`` (``q``,
    ``channel_scale``, ``group_scale`` as the format defines them); ``method``: the algorithm that made it."""
    return {
        "quant_method": "quick",
        "bits": 4,
        "a_bit": 8,
        "group_size": int(group_size),
        "zero_point": False,
        "version": W4A8_VERSION,
        "method": method,
        "storage": storage,
        "modules_to_not_convert": list(modules_to_not_convert),
    }


def w4a8_modules(model: nn.Module) -> dict[str, QuickLinearW4A8]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuickLinearW4A8)}


def _w4a8_state_for_save(
    model: nn.Module, quant_config: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.dtype]:
    """Config, tensors and dense dtype of a W4A8 model; layers whose storage differs are listed by name."""
    mods = w4a8_modules(model)
    if packed_modules(model):
        raise CheckpointError("model mixes W4A16 (QuickLinear) and W4A8 layers; one format per checkpoint")
    first = next(iter(mods.values()))
    qc = dict(quant_config) if quant_config else make_w4a8_quant_config(first.group_size)
    if not is_w4a8_config(qc):
        raise CheckpointError(f"W4A8 layers cannot be saved under quantization_config version {qc.get('version')!r}")
    bad = [n for n, m in mods.items() if m.group_size != qc["group_size"]]
    if bad:
        raise CheckpointError(f"{len(bad)} W4A8 layers (e.g. {bad[0]}) do not use group size {qc['group_size']}")
    storages = [m.storage for m in mods.values()]
    qc["storage"] = max(set(storages), key=storages.count)
    others = {n: m.storage for n, m in mods.items() if m.storage != qc["storage"]}
    if others:
        qc["module_storage"] = others
    dtypes = {m.dtype for m in mods.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"W4A8 layers use several dtypes {sorted(map(str, dtypes))}; one is supported")
    dense_dtype = first.dtype
    out: dict[str, torch.Tensor] = {}
    for name, mod in mods.items():
        for t_name, t in mod.stored().items():
            out[f"{name}.{t_name}"] = t
        if mod.bias is not None:
            out[f"{name}.bias"] = mod.bias
    _add_dense_state(model, set(mods), dense_dtype, out)
    return qc, {k: v.detach().to("cpu").contiguous() for k, v in out.items()}, dense_dtype


@torch.no_grad()
def _load_w4a8(
    path: Path, qc: dict[str, Any], device: torch.device, dtype: torch.dtype | None, layout: str | None = None
) -> nn.Module:
    """Load a W4A8 checkpoint: ``QuickLinearW4A8`` wherever the files hold ``<linear>.channel_scale``; packed
    layers are repacked (exactly) into ``layout``, default the fastest for ``device``."""
    from transformers import AutoConfig

    if int(qc.get("bits", qc.get("w_bit", 4))) != 4 or int(qc.get("a_bit", 8)) != 8:
        raise CheckpointError(f"{path}: W4A8 checkpoints have bits=4 and a_bit=8, got {qc}")
    group_size = int(qc.get("group_size", -1))
    target = layout or preferred_w4a8_layout(device)
    storage_of = qc.get("module_storage") or {}
    files = _weight_files(path)
    headers = {f: _read_header(f) for f in sorted(set(files.values()))}
    meta = {k: v for h in headers.values() for k, v in h.items()}
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    stored = getattr(torch, stored, None) if isinstance(stored, str) else stored
    layer_dtype = stored if stored in (torch.float16, torch.bfloat16) else torch.float16
    dense_dtype = dtype or layer_dtype
    model = _skeleton(config, dense_dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.channel_scale" in meta}
    _check_orphans(meta, ".channel_scale", linears, config)
    pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in linears}

    def claim(f: Path, key: str, sf: Any) -> bool:
        prefix, _, tname = key.rpartition(".")
        if prefix not in linears:
            return False
        pending[prefix][tname] = sf.get_tensor(key)
        return True

    _read_tensors(headers, model, dense_dtype, claim)
    for name, lin in linears.items():
        tensors = pending[name]
        bias = tensors.pop("bias", None)
        try:
            storage = storage_of.get(name, qc.get("storage", "w4a8"))
            mod = QuickLinearW4A8.from_tensors(
                tensors, storage, group_size, bias, layer_dtype, lin.in_features,
                layout=None if storage == UNPACKED else target,
            )  # fmt: skip
        except (ValueError, LayoutError) as e:
            raise CheckpointError(f"{path}: W4A8 layer '{name}': {e}") from None
        if mod.out_features != lin.out_features or mod.in_features < lin.in_features:
            raise CheckpointError(
                f"{path}: W4A8 layer '{name}' holds [{mod.out_features}, {mod.in_features}] weights, "
                f"the model needs [{lin.out_features}, {lin.in_features}]"
            )
        if (lin.bias is not None) != (bias is not None):
            raise CheckpointError(f"{path}: W4A8 layer '{name}': bias {'missing' if bias is None else 'unexpected'}")
        _replace_module(model, name, mod)
    _finish(model, path, dense_dtype, device)
    model.quick_quant_config = dict(qc)
    model.quick_source_quant_config = dict(qc)
    return model
