"""The model repository: MODEL_REPOSITORY/<model>/<version>/model.onnx (+ <model>/config.yaml)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from podserve.errors import NotFound
from podserve.model_config import CONFIG_NAMES, ModelConfig, load_model_config
from podserve.onnx_model import OnnxModel, ThreadBudget
from podserve.settings import Settings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """Start-up must fail loudly, naming the file and the reason."""


@dataclass
class ServedModel:
    """All loaded versions of one model; the highest version number is the default."""

    name: str
    versions: dict[str, OnnxModel] = field(default_factory=dict)

    @property
    def default(self) -> OnnxModel:
        return self.versions[max(self.versions, key=int)]

    def get(self, version: str | None) -> OnnxModel:
        if version is None or version == "":
            return self.default
        model = self.versions.get(version)
        # "01" names version 1, as in Triton (and no int() of thousands of digits: a 500)
        if model is None and _is_number(version) and len(version) <= 20:
            model = self.versions.get(str(int(version)))
        if model is None:
            raise NotFound(
                f"model '{self.name}' has no version '{version}'; "
                f"available: {sorted(self.versions, key=int)}"
            )
        return model


class ModelRepository:
    def __init__(self, models: dict[str, ServedModel]) -> None:
        self.models = models
        # Most requests name no version: their model is looked up once, not per request.
        self._defaults = {name: served.default for name, served in models.items()}

    def get(self, name: str, version: str | None = None) -> OnnxModel:
        if not version:
            model = self._defaults.get(name)
            if model is not None:
                return model
        served = self.models.get(name)
        if served is None:
            raise NotFound(f"unknown model '{name}'; available: {sorted(self.models)}")
        return served.get(version)

    def all_versions(self) -> list[OnnxModel]:
        return [m for served in self.models.values() for m in served.versions.values()]


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()  # not "²" or "٣", which isdigit() accepts


def _ignored(path: Path) -> bool:
    """Hidden directories (a Kubernetes volume's `..data`, `.git`) are no models or versions;
    nor is `lost+found` at the root of a mounted volume."""
    return path.name.startswith(".") or path.name == "lost+found"


def _looks_like_a_model(model_dir: Path) -> bool:
    """A YAML model config, an *.onnx file, or a folder holding one: meant as a model, so any
    mistake in its layout fails the start; other folders beside the models are left alone.
    A config.json alone is no sign: Hugging Face writes one beside a shared tokenizer."""
    return bool(_yaml_configs(model_dir) or _loose_onnx(model_dir)) or any(
        _loose_onnx(path) for path in model_dir.iterdir() if path.is_dir() and not _ignored(path)
    )


def _yaml_configs(model_dir: Path) -> list[str]:
    """config.yaml and config.yml: podserve's own (a config.json may be Hugging Face's, and
    is read only where neither exists)."""
    return [name for name in CONFIG_NAMES[:2] if (model_dir / name).exists()]


def _loose_onnx(folder: Path) -> list[Path]:
    """*.onnx files directly in `folder` (any case: model.ONNX is no model.onnx either)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())


def _version_dirs(model_dir: Path) -> dict[str, Path]:
    """Version -> its directory. Versions are integers, as in Triton: "01" is version 1 (two
    directories for one number are an error), and a model needs at least one."""
    versions: dict[str, Path] = {}
    others: list[str] = []
    for path in sorted(p for p in model_dir.iterdir() if p.is_dir() and not _ignored(p)):
        if not _is_number(path.name):
            others.append(path.name)
            if (path / "model.onnx").exists():  # a typo'd version, not a tokenizer's folder
                raise ModelLoadError(
                    f"{path}: version directories must be numbers (e.g. {model_dir}/1)"
                )
            continue
        version = str(int(path.name))
        if version in versions:
            raise ModelLoadError(
                f"{model_dir}: directories {versions[version].name!r} and {path.name!r} "
                f"are both version {version}"
            )
        versions[version] = path
    if not versions:
        loose = _loose_onnx(model_dir)
        if loose:  # the flat layout of other servers: repo/<model>/model.onnx
            raise ModelLoadError(
                f"{loose[0]}: a model must be in a version folder: {model_dir}/1/model.onnx"
            )
        # The chart mounts each modelConfigs entry over <repository>/<model>/config.yaml:
        # one naming a model the image lacks makes such a directory, and a crash loop.
        lone = not others and [p.name for p in model_dir.iterdir()] == ["config.yaml"]
        hint = "; only a config.yaml: is a Helm modelConfigs entry for a model the image lacks?"
        raise ModelLoadError(
            f"{model_dir}: no version directory (version directories must be numbers, "
            f"e.g. {model_dir}/1/model.onnx; found {others or 'none'}){hint if lone else ''}"
        )
    return dict(sorted(versions.items(), key=lambda item: int(item[0])))


def _misnamed(version_dir: Path) -> str:
    """The hint for a version directory without a model.onnx."""
    found = [p.name for p in _loose_onnx(version_dir)]
    if found:
        return f" (found {', '.join(found)}: the file must be named model.onnx)"
    return " (every version directory needs a model.onnx)"


@dataclass(frozen=True)
class _ModelPlan:
    """One model's layout and config, checked before any session is made."""

    model_dir: Path
    config: ModelConfig
    versions: dict[str, Path]  # version -> its model.onnx


def load_repository(root: Path, settings: Settings, threads: ThreadBudget) -> ModelRepository:
    """Every model's layout and config is checked first (milliseconds), so a typo in the last
    model's config.yaml fails the start before minutes of loading the others; and every
    broken model is named in one error, not one per crash-looping restart."""
    if not root.is_dir():
        raise ModelLoadError(f"model repository {root} does not exist or is not a directory")
    plans: list[_ModelPlan] = []
    errors: list[ModelLoadError] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _ignored(p)):
        if not _looks_like_a_model(model_dir):  # a shared tokenizer's folder, docs, ...
            log.warning("not a model (no config.yaml or config.yml, no *.onnx): skipped",
                        extra={"directory": str(model_dir)})  # fmt: skip
            continue
        try:
            plans.append(_plan_model(model_dir))
        except ModelLoadError as exc:
            errors.append(exc)
    if not plans and not errors:
        raise ModelLoadError(f"model repository {root} holds no <model>/<version>/model.onnx")
    _raise_all(errors)
    models: dict[str, ServedModel] = {}
    for plan in plans:
        try:
            models[plan.model_dir.name] = _load_model(plan, settings, threads)
        except ModelLoadError as exc:  # the others still load: all failures are named
            errors.append(exc)
    _raise_all(errors)
    return ModelRepository(models)


def _raise_all(errors: list[ModelLoadError]) -> None:
    """One error as it is; several as one, each on its own line."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        listed = "\n".join(f"- {exc}" for exc in errors)
        raise ModelLoadError(f"{len(errors)} models failed to load:\n{listed}") from errors[0]


def _plan_model(model_dir: Path) -> _ModelPlan:
    configs = _yaml_configs(model_dir)
    if len(configs) > 1:  # only the first would be read, the other silently ignored
        raise ModelLoadError(f"{model_dir}: more than one model config ({', '.join(configs)})")
    try:
        config = load_model_config(model_dir)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    versions: dict[str, Path] = {}
    for version, version_dir in _version_dirs(model_dir).items():
        path = version_dir / "model.onnx"
        if not path.exists():
            raise ModelLoadError(f"{path}: missing{_misnamed(version_dir)}")
        versions[version] = path
    return _ModelPlan(model_dir, config, versions)


def _load_model(plan: _ModelPlan, settings: Settings, threads: ThreadBudget) -> ServedModel:
    name = plan.model_dir.name
    served = ServedModel(name)
    for version, path in plan.versions.items():
        try:
            model = OnnxModel(
                name=name,
                version=version,
                path=path,
                config=plan.config,
                threads=threads,
                default_max_batch_size=settings.max_batch_size,
                default_max_batch_delay_ms=settings.max_batch_delay_ms,
                default_allow_nonfinite=settings.allow_nonfinite,
                max_rows_per_request=settings.max_rows_per_request,
            )
            model.warm_up()
        except Exception as exc:  # any failure here must name the file
            raise ModelLoadError(f"{path}: failed to load: {type(exc).__name__}: {exc}") from exc
        served.versions[version] = model
        log.info(
            "model loaded",
            extra={"model": model.name, "version": model.version, "batching": model.batching},
        )
    return served
