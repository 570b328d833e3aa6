"""What a caller may do: `local` mode (one trusted user) or `public` mode (anonymous visitors of a Space).

One `Policy` decides, and every entry point asks it: the UI handlers (hidden API
functions included, since a public Space serves every one of them), and the CLI.
Hiding a widget is never the enforcement. It owns the mode, the limits (one table,
overridable by the operator through RUOZHI_LIMIT_* variables), the allowlists of
models and data sources, each visitor's own runs and uploads folder, the checks of
user text, and the redaction of server paths from what a public visitor is shown.
It knows nothing of Gradio; it reads the environment only in `policy_from_env`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from . import specs
from .checkpoints import UPLOADS_DIR, VISITORS_DIR, is_checkpoint
from .errors import ConfigError, PolicyError

MODES = ("local", "public")
DEFAULT_PUBLIC_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct",)
TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Limits:
    """Upper bounds the server enforces. Public defaults keep one Space GPU shared and its disk bounded;
    local defaults only refuse values that cannot be meant (a seed over 2**32, a 10**9 batch)."""
    epochs: int = 1000
    max_steps: int = 10**7  # optimiser steps in one run
    batch_size: int = 4096
    grad_accum_steps: int = 4096
    warmup_steps: int = 10**7
    max_source_length: int = 32768  # and never above the model's context (checked with its config)
    max_target_length: int = 32768
    lora_rank: int = 1024
    lora_alpha: int = 4096
    seed: int = 2**32 - 1  # numpy and CUDA seeds are 32-bit
    ab_prompts: int = 10000  # rows of one batch A/B table
    max_new_tokens: int = 8192
    text_chars: int = 100_000  # one chat message, system prompt or pasted prompt list
    config_layers: int = 1024  # the estimate refuses a model config beyond these before building anything
    config_hidden: int = 65536
    config_vocab: int = 4_000_000
    config_intermediate: int = 262144
    config_heads: int = 1024
    checkpoints_per_run: int = 0  # epoch checkpoints kept besides `final` (0 = all)
    session_disk_mb: int = 0  # a visitor's runs + uploads (0 = no quota)
    upload_mb: int = 200  # one uploaded data file
    gpus: int = 64  # processes of one run (torchrun); the machine's GPU count bounds it too
    # --- the server itself (ui/guard.py, chats.py, bounds.py, jobs.py): checked before any handler works
    request_kb: int = 65536  # one request body other than an upload (JSON events)
    upload_files: int = 1000  # files in one upload request
    temp_mb: int = 0  # Gradio's upload/temp folder, all visitors together (0 = no cap)
    sessions: int = 10000  # page sessions whose state (Gradio's and the chat histories) is kept, oldest dropped
    queue_size: int = 0  # events waiting in Gradio's queue, all visitors together (0 = no cap)
    generation_concurrency: int = 2  # Compare chats and A/B tables decoding at once, all visitors together
    chat_turns: int = 1000  # user turns in one Compare conversation
    chat_chars: int = 10**7  # characters of one Compare conversation, all turns together
    record_chars: int = 10**7  # one dataset record (all its fields)
    file_chars: int = 10**9  # one dataset (all its records)
    train_seconds: int = 0  # wall time of one training run before it is stopped and saved (0 = no bound)
    train_cooldown_s: int = 0  # after a visitor's run ends, before the same visitor may start another
    visitors_disk_mb: int = 0  # all public visitors' runs + uploads together (0 = no cap); tokens are free
    visitor_idle_h: int = 24  # over that cap, visitors' folders idle this long are removed first
    export_mb: int = 0  # what one export (zip, GGUF, Hub push) may read of a checkpoint (0 = no limit)


PUBLIC_LIMITS = dataclasses.replace(
    Limits(), epochs=10, max_steps=5000, batch_size=64, grad_accum_steps=16, warmup_steps=1000,
    max_source_length=1024, max_target_length=1024, lora_rank=64, lora_alpha=256, ab_prompts=200,
    max_new_tokens=512, text_chars=4000, config_layers=256, config_hidden=16384, config_vocab=300_000,
    config_intermediate=65536, config_heads=256, checkpoints_per_run=1, session_disk_mb=6000, upload_mb=50, gpus=8,
    request_kb=256, upload_files=2, temp_mb=2000, sessions=500, queue_size=64, generation_concurrency=2, chat_turns=16,
    chat_chars=16000, record_chars=20000, file_chars=20_000_000, train_seconds=3600, train_cooldown_s=600,
    visitors_disk_mb=30000, export_mb=4000)


@dataclass(frozen=True)
class Visitor:
    """Whose runs and uploads a request may see: `local` (the whole runs folder) or one public visitor."""
    id: str
    runs_root: Path  # this visitor's runs; the JobRunner and every listing use it
    uploads: Path

    @property
    def is_local(self) -> bool:
        return self.id == "local"


@dataclass(frozen=True)
class Policy:
    mode: str = "local"
    runs_root: Path = field(default_factory=lambda: Path("runs").resolve())
    limits: Limits = field(default_factory=Limits)
    models: tuple[str, ...] = DEFAULT_PUBLIC_MODELS  # public: the Hub models a visitor may pick (and `demo`)
    remote_code_models: tuple[str, ...] = ()  # the operator's allowlist for trust_remote_code

    @property
    def public(self) -> bool:
        return self.mode == "public"

    # --- visitors ------------------------------------------------------------------------
    def visitor(self, token: str | None = None, fallback: str = "") -> Visitor:
        """Local: the one user. Public: the visitor a browser token (or, for API clients, the session) names.
        The folder is a hash of the token, so a folder name seen anywhere never reveals the token."""
        root = Path(self.runs_root)
        if not self.public:
            return Visitor("local", root, root / UPLOADS_DIR)
        token = token if isinstance(token, str) and TOKEN.match(token) else None
        seed = token or f"session:{fallback}"
        if not token and not fallback:
            raise PolicyError(key="err.policy.no_session")
        folder = root / VISITORS_DIR / hashlib.sha256(seed.encode()).hexdigest()[:32]
        return Visitor(folder.name, folder, folder / UPLOADS_DIR)

    # --- models --------------------------------------------------------------------------
    def check_model(self, spec: str) -> str:
        """The spec, stripped, when this mode allows it; PolicyError otherwise."""
        spec = check_text(spec, "model", max_chars=300).strip()
        if not spec:
            raise PolicyError(key="err.policy.no_model")
        if not self.public:
            return spec
        if spec.lower() == specs.DEMO:
            return specs.DEMO
        if spec in self.models:
            return spec
        raise PolicyError(key="err.policy.model", models=", ".join(self.allowed_models))

    @property
    def allowed_models(self) -> tuple[str, ...]:
        return (*self.models, specs.DEMO)

    def trust_remote_code(self, spec: str, asked: bool) -> bool:
        """Local: what the user ticked. Public: only for the operator's allowlist, whatever a visitor sends."""
        if self.public:
            return spec.strip() in self.remote_code_models
        return bool(asked)

    # --- data ----------------------------------------------------------------------------
    def check_data_source(self, source: str, visitor: Visitor) -> str:
        """The source, stripped, when allowed; in public mode never a server path, URL, glob or builder."""
        source = check_text(source, "dataset source", max_chars=500).strip()
        if not source:
            raise PolicyError(key="err.policy.no_source")
        kind = specs.data_kind(source, look_at_disk=not self.public)
        name = specs.upload_name(source)
        if kind == "upload" and name and safe_file_name(name) == name:
            if not (visitor.uploads / name).is_file():
                raise PolicyError(key="err.policy.no_upload", name=name)
            return source
        if kind == "upload":
            kind = "invalid"  # a name with a folder in it: never a path, in either mode
        if kind in ("sample", "hub") or (kind == "path" and not self.public):
            if kind == "hub" and self.public and Path(specs.split_hub_dataset(source)[0]).exists():
                raise PolicyError(key="err.policy.not_hub", source=source)  # a local folder
            return source
        if self.public:
            raise PolicyError(key="err.policy.public_source")
        raise PolicyError(key="err.data.unknown_source", source=source)

    # --- checkpoints ---------------------------------------------------------------------
    def resolve_checkpoint(self, value: str, visitor: Visitor) -> Path:
        """A checkpoint picked in Compare (or resumed): `run/checkpoints/name` under the visitor's runs folder;
        local mode also takes any folder. Refused with the same words whether or not a path exists."""
        value = check_text(value, "checkpoint", max_chars=500).strip()
        root = visitor.runs_root.resolve()
        parts = Path(value).parts
        inside = (len(parts) == 3 and parts[1] == "checkpoints" and not any(p.startswith(".") for p in parts)
                  and not Path(value).is_absolute())
        if inside:
            path = (root / value).resolve()
            if path.parent.parent.parent == root and is_checkpoint(path):
                return path
        elif not self.public and value:
            path = Path(value).expanduser().resolve()
            if path.is_dir():
                return path
        if self.public:
            raise PolicyError(key="err.policy.not_yours", value=value)
        raise PolicyError(key="err.policy.no_checkpoint", value=value)

    def show_path(self, path: str | Path, visitor: Visitor) -> str:
        """How a path appears to this visitor: relative to their runs folder (public), as it is (local)."""
        if not path:
            return ""
        if not self.public:
            return str(path)
        try:
            return str(Path(path).resolve().relative_to(visitor.runs_root.resolve()))
        except ValueError:
            return Path(path).name

    def redact(self, text: str, visitor: Visitor | None = None) -> str:
        """Public mode: no absolute server path in text shown to a visitor (their own runs relative, others
        reduced to the last name); local mode: unchanged."""
        if not self.public or not text:
            return text
        if visitor is not None:
            text = text.replace(str(visitor.runs_root.resolve()) + os.sep, "").replace(str(visitor.runs_root), "")
        return ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or "…", text)

    # --- limits --------------------------------------------------------------------------
    def check_train_config(self, cfg, visitor: Visitor):
        """The TrainConfig as this mode runs it (trust_remote_code decided here, checkpoints kept bounded),
        or PolicyError naming the first limit exceeded."""
        lim = self.limits
        spec = self.check_model(cfg.model.spec)
        source = self.check_data_source(cfg.data.source, visitor)
        check_text(cfg.run_name, "run_name", max_chars=1000)
        for name, value in (("system_prompt", cfg.data.system_prompt), *(("probe prompt", p) for p in cfg.probe_prompts)):
            check_text(value, name, multiline=True, max_chars=lim.text_chars)
        bounds = [("epochs", cfg.epochs, lim.epochs), ("max_steps", cfg.max_steps, lim.max_steps),
                  ("batch_size", cfg.batch_size, lim.batch_size),
                  ("grad_accum_steps", cfg.grad_accum_steps, lim.grad_accum_steps),
                  ("warmup_steps", cfg.warmup_steps, lim.warmup_steps),
                  ("max_source_length", cfg.data.max_source_length, lim.max_source_length),
                  ("max_target_length", cfg.data.max_target_length, lim.max_target_length),
                  ("lora_rank", cfg.lora_rank, lim.lora_rank), ("lora_alpha", cfg.lora_alpha, lim.lora_alpha),
                  ("seed", cfg.seed, lim.seed), ("data seed", cfg.data.seed, lim.seed),
                  ("probe_max_new_tokens", cfg.probe_max_new_tokens, lim.max_new_tokens),
                  ("gpus", cfg.gpus, lim.gpus)]
        for name, value, bound in bounds:
            check_at_most(name, value, bound)
        check_at_least("seed", cfg.seed, 0)
        check_at_least("data seed", cfg.data.seed, 0)
        if len(cfg.probe_prompts) > 10:
            raise PolicyError(key="err.policy.probes")
        if self.public and cfg.gpus > 1 and cfg.device == "cpu":  # CPU processes are for tests, not visitors
            raise PolicyError(key="err.policy.cpu_processes")
        changes = dict(model=dataclasses.replace(cfg.model, spec=spec,
                                                 trust_remote_code=self.trust_remote_code(spec, cfg.model.trust_remote_code)),
                       data=dataclasses.replace(cfg.data, source=source))
        if self.public:
            if cfg.max_steps == 0:
                changes["max_steps"] = lim.max_steps  # no run is unbounded in public mode
            if cfg.resume_from:
                changes["resume_from"] = str(self.resolve_checkpoint(self.show_path(cfg.resume_from, visitor), visitor))
        kept = lim.checkpoints_per_run
        if kept and hasattr(cfg, "keep_checkpoints") and not 0 < cfg.keep_checkpoints <= kept:
            changes["keep_checkpoints"] = kept
        return dataclasses.replace(cfg, **changes)

    def check_text(self, value, field: str, multiline: bool = False, max_chars: int | None = None) -> str:
        return check_text(value, field, multiline, min(max_chars or self.limits.text_chars, self.limits.text_chars))

    def check_train_lengths(self, max_source_length, max_target_length) -> None:
        """The max lengths the Data tab measures with: whole numbers within this mode's limits."""
        for name, value, bound in (("max_source_length", max_source_length, self.limits.max_source_length),
                                   ("max_target_length", max_target_length, self.limits.max_target_length)):
            if not isinstance(value, (int, float)) or value != value or int(value) != value:
                raise ConfigError(key="err.form.whole", name=name)
            check_at_least(name, int(value), 1)
            check_at_most(name, int(value), bound)

    def check_generation(self, max_new_tokens: int, num_prompts: int = 1) -> None:
        check_at_most("max_new_tokens", max_new_tokens, self.limits.max_new_tokens)
        check_at_most("the number of A/B prompts", num_prompts, self.limits.ab_prompts)

    def check_config_shape(self, config) -> None:
        """Refuse an absurd model config (layers, widths, vocabulary) before anything is built from it."""
        lim = self.limits
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name, bound in (("num_hidden_layers", lim.config_layers), ("hidden_size", lim.config_hidden),
                            ("vocab_size", lim.config_vocab), ("intermediate_size", lim.config_intermediate),
                            ("num_attention_heads", lim.config_heads), ("num_key_value_heads", lim.config_heads)):
            value = getattr(text, name, None)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
                raise PolicyError(key="err.policy.config_shape", name=name, value=repr(value), bound=f"{bound:,}")

    # --- disk ----------------------------------------------------------------------------
    def check_export(self, visitor: Visitor, nbytes: int) -> None:
        """An export reading `nbytes` of a checkpoint (and writing about as much) is within the export limit
        and the visitor's disk quota, before it starts."""
        limit = self.limits.export_mb
        if limit and nbytes > limit * 2**20:
            raise PolicyError(key="err.export.too_big", mb=f"{nbytes / 2**20:,.0f}", limit=f"{limit:,}")
        quota = self.limits.session_disk_mb * 2**20
        if quota and folder_bytes(visitor.runs_root) + nbytes > quota:
            raise PolicyError(key="err.policy.quota", mb=self.limits.session_disk_mb)

    def make_room(self, visitor: Visitor, keep: tuple[Path, ...] = ()) -> None:
        """Keep a public visitor's folder under its quota: delete their oldest runs first (never those in
        `keep`, e.g. the running one); refuse when that is not enough."""
        self._make_shared_room(visitor)
        quota = self.limits.session_disk_mb * 2**20
        if not quota or not visitor.runs_root.exists():
            return
        runs = sorted((p for p in visitor.runs_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime)
        keep_resolved = {Path(k).resolve() for k in keep}
        while folder_bytes(visitor.runs_root) > quota:
            victims = [p for p in runs if p.resolve() not in keep_resolved and p.exists()]
            if not victims:
                raise PolicyError(key="err.policy.quota", mb=self.limits.session_disk_mb)
            shutil.rmtree(victims[0], ignore_errors=True)
            runs.remove(victims[0])


    def _make_shared_room(self, visitor: Visitor) -> None:
        """All visitors together stay under `visitors_disk_mb` (a new token is free, so a per-visitor quota alone
        bounds nothing): over it, folders of other visitors idle for `visitor_idle_h` go, oldest first; when that
        is not enough, the server is full for now."""
        cap = self.limits.visitors_disk_mb * 2**20
        everyone = Path(self.runs_root) / VISITORS_DIR
        if not self.public or not cap or not everyone.is_dir():
            return
        folders = [(last_touched(p), p) for p in everyone.iterdir() if p.is_dir() and p.name != visitor.id]
        idle_before = time.time() - self.limits.visitor_idle_h * 3600
        expirable = sorted((t, p) for t, p in folders if t < idle_before)
        while folder_bytes(everyone) > cap:
            if not expirable:
                raise PolicyError(key="err.policy.server_full")
            shutil.rmtree(expirable.pop(0)[1], ignore_errors=True)


# An absolute POSIX path of two or more parts, as it would appear inside a message.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[^\s'\"`<>|:,;()\[\]{}]+/)+[^\s'\"`<>|:,;()\[\]{}]*")


def check_at_most(name: str, value, bound) -> None:
    if value > bound:
        raise PolicyError(key="err.limit.at_most", name=name, bound=f"{bound:,}", value=f"{value:,}")


def check_at_least(name: str, value, bound) -> None:
    if value < bound:
        raise PolicyError(key="err.limit.at_least", name=name, bound=f"{bound:,}", value=f"{value:,}")


def check_text(value, field: str, multiline: bool = False, max_chars: int | None = None) -> str:
    """A user string as the app stores it, or ConfigError: no lone UTF-16 surrogates (they cannot be
    written as UTF-8 and would break every status stream), no control characters (tab and newlines
    only in multi-line text), and at most `max_chars` characters."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(key="err.text.not_text", field=field)
    if max_chars is not None and len(value) > max_chars:
        raise ConfigError(key="err.text.too_long", field=field, n=f"{len(value):,}", max=f"{max_chars:,}")
    allowed = "\t\n\r" if multiline else ""
    for i, ch in enumerate(value):
        if "\ud800" <= ch <= "\udfff":
            raise ConfigError(key="err.text.surrogate", field=field, code=f"{ord(ch):04X}", position=i)
        if unicodedata.category(ch) == "Cc" and ch not in allowed:
            raise ConfigError(key="err.text.control", field=field, code=f"{ord(ch):04X}", position=i)
    return value


def safe_text(value: str) -> str:
    """Any string made UTF-8-safe (lone surrogates replaced), for what is stored and sent to every page."""
    return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else str(value)


def safe_file_name(name: str) -> str:
    """An uploaded file's name as kept in the uploads folder: its last part, no leading dot, safe characters."""
    name = unicodedata.normalize("NFKC", Path(str(name)).name)
    name = re.sub(r"[^\w.\-]+", "-", name).lstrip(".-")[:120]
    return name


def new_token() -> str:
    return secrets.token_hex(16)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def last_touched(folder: Path) -> float:
    """The newest modification time of a folder or anything directly in it or one level down."""
    times = [folder.stat().st_mtime]
    for child in folder.iterdir():
        times.append(child.stat().st_mtime)
        if child.is_dir():
            times.extend(c.stat().st_mtime for c in child.iterdir())
    return max(times)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _limits_from_env(base: Limits, env) -> Limits:
    """RUOZHI_LIMIT_<FIELD>=<int> overrides one limit (e.g. RUOZHI_LIMIT_EPOCHS=20)."""
    changes = {}
    for f in dataclasses.fields(Limits):
        raw = env.get(f"RUOZHI_LIMIT_{f.name.upper()}")
        if raw is None:
            continue
        try:
            changes[f.name] = int(raw)
        except ValueError:
            raise ConfigError(f"RUOZHI_LIMIT_{f.name.upper()}={raw!r}: give a whole number") from None
    return dataclasses.replace(base, **changes)


def _names(raw: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (raw or "").split(",") if n.strip())


def detect_mode(host: str | None, env=None) -> str:
    """RUOZHI_MODE decides when set; otherwise public on a Space or whenever the host is not loopback."""
    env = os.environ if env is None else env
    forced = env.get("RUOZHI_MODE", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ConfigError(f"RUOZHI_MODE={forced!r}: use 'public' or 'local'")
        return forced
    if env.get("SYSTEM") == "spaces" or env.get("SPACE_ID"):
        return "public"
    return "local" if host is None or is_loopback(host) else "public"


def policy_from_env(runs_root: Path, host: str | None = None, env=None, mode: str | None = None) -> Policy:
    """The operator's policy: mode, limits (RUOZHI_LIMIT_*), RUOZHI_ALLOWED_MODELS (extra Hub ids for
    public visitors) and RUOZHI_REMOTE_CODE_MODELS (Hub ids allowed to run their own code)."""
    env = os.environ if env is None else env
    mode = mode or detect_mode(host, env)
    base = PUBLIC_LIMITS if mode == "public" else Limits()
    return Policy(mode=mode, runs_root=Path(runs_root).resolve(), limits=_limits_from_env(base, env),
                  models=tuple(dict.fromkeys(DEFAULT_PUBLIC_MODELS + _names(env.get("RUOZHI_ALLOWED_MODELS")))),
                  remote_code_models=_names(env.get("RUOZHI_REMOTE_CODE_MODELS")))
