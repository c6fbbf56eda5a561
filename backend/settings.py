"""One typed settings object for the whole backend.

Values come from ``BOXLOOP_*`` environment variables, then from an optional
YAML/JSON config file named by ``BOXLOOP_CONFIG``; environment variables win.
Everything that a user might want to change lives here, so there is exactly
one place to read when asking "what can I configure?".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Official YOLOX-Nano COCO ONNX release asset (Megvii-BaseDetection/YOLOX, release 0.1.1rc0).
DEFAULT_MODEL_URL = (
    "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx"
)

DetectorName = Literal[
    "yolox_nano", "fasterrcnn_effnet_lite0", "fasterrcnn_mobilenet_v3", "ssdlite320"
]
#: How many epochs the gate's cross-validation fold models train (``GateConfig.cv_fold_epochs``).
FoldEpochRule = Literal["visits", "candidate", "by_size"]
#: The image-level orders (:mod:`backend.ordering.strategies`).
OrderStrategy = Literal["random", "similar", "dissimilar", "temporal"]


def _default_shared_data() -> Path:
    return Path(os.environ.get("BOXLOOP_SHARED_DATA", "../shared/data"))


class Settings(BaseSettings):
    """All boxloop configuration. Read with :func:`get_settings`."""

    # env_ignore_empty: `VAR=` in an env file or `${VAR:-}` in compose means unset; read as a
    # value it became the path "." (a model path that hid the fetched model, a utility model
    # that turned utility on). The auth variables keep refusing it: _auth_protects_something.
    model_config = SettingsConfigDict(env_prefix="BOXLOOP_", extra="ignore", env_ignore_empty=True)

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./var/boxloop"), description="Database, model versions, features.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/boxloop.db. PostgreSQL works.",
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=1, le=65535)
    auth_token: SecretStr | None = Field(
        None, description="If set, every request needs Bearer <token>."
    )
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    max_request_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1,
        description="Larger request bodies get a 413 before they are read. Label Studio sends "
        "/predict a task list, each task with its annotations and earlier predictions: a few "
        "hundred tasks come to about 10-15 MB.",
    )

    # --- Label Studio --------------------------------------------------------------------------
    label_studio_url: str | None = Field(None, description="e.g. http://127.0.0.1:8080")
    label_studio_token: SecretStr | None = Field(
        None, description="Legacy API token (Token ...) used for the SDK and image fetches."
    )
    allowed_local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Local directories images may be read from."
    )
    allowed_image_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts images may be fetched from besides label_studio_url: "
        "'scheme://host:port' origins or bare 'host[:port]', comma-separated. Without "
        "label_studio_url, a /setup hostname is used only when it is listed here.",
    )
    reconcile_on_startup: bool = True

    # --- images --------------------------------------------------------------------------------
    max_image_pixels: int = Field(40_000_000, ge=1, description="Larger images get a 413.")
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    image_fetch_timeout_s: float = Field(20.0, gt=0)
    training_image_memory_mb: int = Field(
        4096,
        ge=0,
        description="Decoded pixels a training job holds in memory; past it, an image stays as its "
        "file's bytes and is decoded on each use (slower; a JPEG takes a tenth of the memory).",
    )

    # --- detector ------------------------------------------------------------------------------
    detector: DetectorName = Field(
        "yolox_nano",
        description="What trains: yolox_nano (COCO-pretrained, from the ONNX model; the default) "
        "or a torchvision Faster R-CNN / SSDlite (ImageNet or COCO weights on disk).",
    )
    torchvision_weights_dir: Path | None = Field(
        None, description="TORCH_HOME-style dir holding COCO weights for torchvision detectors."
    )
    onnx_model_path: Path | None = Field(
        None,
        description="Inference-only COCO ONNX detector (YOLOX) used before the first training; "
        "unset: the model `boxloop models fetch` put in the data dir, if there.",
    )
    onnx_class_names_path: Path | None = Field(
        None,
        description="The ONNX model's class names, one a line in output order; unset: "
        "coco_classes.txt beside the model. Serving and training both read it.",
    )
    pretrained_input: Literal["square", "aspect"] = Field(
        "square",
        description="How the COCO model letterboxes an image before the first training: square "
        "(its 416x416 input, as exported) or aspect (a dynamic-input export of the same weights; "
        "each image gets a shape following its aspect ratio at the same pixel budget, as "
        "fine-tuned versions do). Wide frames (dashcams) gain most: docs/backend.md.",
    )
    detector_min_size: int = Field(512, ge=32)
    detector_max_size: int = Field(853, ge=32)
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    num_threads: int = Field(2, ge=1, description="torch / onnxruntime intra-op threads.")
    model_url: str = Field(
        DEFAULT_MODEL_URL,
        description="Where `boxloop models fetch` gets the COCO YOLOX-Nano ONNX model (URL or file).",
    )
    model_sha256: str | None = Field(
        None,
        description=(
            "Pin for `boxloop models fetch`: the file's sha256 (hex). A download with another "
            "digest is refused and nothing is installed. Unset: size and format are verified."
        ),
    )

    # --- training ------------------------------------------------------------------------------
    train_after_new_annotations: int = Field(
        10, ge=1, description="Start a background training job after this many new annotations."
    )
    train_epochs: int = Field(8, ge=1)
    train_batch_size: int = Field(4, ge=1)
    train_lr: float = Field(0.01, gt=0)
    train_box_batch_size_per_image: int = Field(128, ge=1)
    train_freeze_backbone_body: bool = True
    train_seed: int = 0
    keep_model_versions: int = Field(
        5, ge=1, description="Version directories kept per project (the serving one always is)."
    )
    yolox_lr: float = Field(1e-3, gt=0, description="YOLOX head learning rate (AdamW).")
    yolox_backbone_lr_mult: float = Field(0.1, ge=0)
    yolox_neck_lr_mult: float = Field(0.3, ge=0)
    yolox_image_visits: int = Field(
        600, ge=1, description="Images a round sees in all; epochs = visits / images, clamped."
    )
    yolox_min_epochs: int = Field(8, ge=1)
    yolox_max_epochs: int = Field(30, ge=1)
    yolox_freeze: Literal["none", "stem", "backbone", "backbone+neck"] = "stem"
    yolox_warm_start: bool = Field(
        True,
        description="Start each round's candidate from the serving version (when it is a YOLOX "
        "version of the same labels that records its training tasks), not from the COCO "
        "weights, so training accumulates over rounds. The gate then judges only on tasks "
        "neither trained on.",
    )
    yolox_input_area: int = Field(
        416 * 416, ge=1, description="Letterbox area; its shape follows the images' aspect ratio."
    )
    gate_validation_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="Annotated tasks a training round holds back to judge its candidate.",
    )
    gate_cv_below: int = Field(
        30,
        ge=0,
        description="Below this many annotated tasks, judge by 2-fold cross-validation: a "
        "held-back slice would hold under 6 tasks, too few for the gate's test to show a gain.",
    )
    gate_cv_fold_epochs: FoldEpochRule = Field(
        "visits",
        description="Epochs of a cross-validation fold model: 'visits' (the default), as many "
        "image visits as the candidate, so the threshold chosen on the folds fits it; "
        "'candidate', the candidate's epochs (half its steps: a round costs two trainings, not "
        "three); 'by_size', the fold's own data size's.",
    )
    gate_confidence: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        description="Confidence (1 - p of a paired sign-flip test over the validation images) "
        "that a candidate saves annotation time, needed to promote it (0: any point gain "
        "promotes).",
    )
    gate_calibration_images: int = Field(
        0,
        ge=0,
        description="Unannotated tasks' images on which a cross-validation round carries its "
        "threshold from the fold models' scores to the candidate's, by matching box counts "
        "(0, the default: serve at the threshold chosen on the fold models; the loop grid "
        "found matching neutral on average, benchmark/results/loop_calibrated).",
    )

    # --- features & ordering -------------------------------------------------------------------
    feature_extractor: str = "imgnet_effnet_lite0"
    feature_batch_size: int = Field(32, ge=1)
    order_batch_size: int = Field(10, ge=1, le=100_000)
    order_strategy: OrderStrategy = "random"
    order_seed: int = Field(0, ge=0, le=2**32 - 1)

    # --- bulk pre-annotation and scale (docs/scale.md) -------------------------------------------
    bulk_batch_size: int = Field(16, ge=1, le=1024, description="Images per inference batch.")
    bulk_fetch_concurrency: int = Field(
        8, ge=1, le=256, description="Images fetched at once (one slow image holds one slot)."
    )
    bulk_push_batch: int = Field(
        100, ge=1, le=5000, description="Predictions per import request to Label Studio."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster for bulk prediction and features (e.g. ray://head:10001 or "
        "auto); unset: everything runs in this process.",
    )

    # --- image utility (docs/utility.md) ---------------------------------------------------------
    utility_model: Path | None = Field(
        None,
        description="Exported utility predictor (ONNX, from `boxloop bench utility`); unset: off.",
    )
    utility_action: Literal["ignore", "flag", "move_to_end"] = Field(
        "flag",
        description="Low-utility tasks: only scored (ignore), flagged in the prediction meta and "
        "task data (flag), or also ordered after every other task (move_to_end).",
    )
    utility_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Below this probability of being useful: low utility."
    )
    utility_data_field: str = Field(
        "boxloop_utility", min_length=1, description="Task data key the score is written to."
    )

    # --- sketch / box-layout search (docs/search.md) ---------------------------------------------
    search_model_dir: Path | None = Field(
        None, description="Trained search model; default <data_dir>/search/model."
    )
    search_top_k: int = Field(50, ge=1, le=10_000, description="Results a search returns.")
    search_nprobe: int = Field(64, ge=1, description="IVF lists a search visits (large pools).")
    search_rerank: int = Field(
        400, ge=1, description="Short list re-scored from the re-rank store (large pools)."
    )
    search_rerank_store: Literal["pq16", "sq4", "sq6", "sq8", "fp16"] = Field(
        "pq16",
        description="Re-rank store: pq16 = a 16-byte PQ of each vector's residual (IVFPQR); "
        "sqN / fp16 = a scalar-quantised copy (IndexRefine).",
    )
    search_flat_below: int = Field(
        50_000,
        ge=1,
        description="Pools smaller than this are searched exactly (Flat); pools under 256 "
        "always are (a compressed index needs 256 vectors to train on).",
    )
    search_index_new_tasks: bool = Field(
        True,
        description="When a search model exists, compute new tasks' search vectors in the "
        "background as TASKS_CREATED arrives, so the next search does not wait for them.",
    )

    # --- misc --------------------------------------------------------------------------------
    log_level: str = Field(
        "INFO",
        description="CRITICAL, ERROR, WARNING, INFO or DEBUG (any case): the levels both Python's "
        "logging and uvicorn know.",
    )

    @field_validator("allowed_local_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [p for p in value.split(os.pathsep) if p]
        return value

    @field_validator("allowed_image_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_not_a_file(cls, value: Path) -> Path:
        """A file there is named as such; it failed at the first write with "File exists"."""
        if value.exists() and not value.is_dir():
            raise ValueError(f"{value} is a file, not a directory")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        """One of the levels both ``logging`` and uvicorn accept, upper case: ``serve`` hands
        it to both, and a level only one knows (``verbose``; ``warn``, ``trace``) crashed it."""
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is no log level; use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str | None) -> str | None:
        """A URL SQLAlchemy parses, of a database the store runs on, with its driver installed:
        a bad one failed only when the store opened, with a traceback."""
        if not value:
            return value
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not an SQLAlchemy URL (e.g. sqlite:////srv/boxloop.db or "
                "postgresql+psycopg://user:password@host/boxloop)"
            ) from None
        if url.get_backend_name() == "postgres":
            raise ValueError(f"{url.drivername}:// is no SQLAlchemy dialect: write postgresql://")
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"{url.get_backend_name()!r} is not supported: boxloop stores to SQLite or "
                "PostgreSQL"
            )
        try:
            url.get_dialect().import_dbapi()
        except ArgumentError as exc:  # NoSuchModuleError: an unknown driver
            raise ValueError(f"unknown driver {url.drivername!r}: {exc}") from None
        except ImportError as exc:
            raise ValueError(
                f"the driver of {url.drivername}:// is not installed ({exc.name}); "
                "postgresql+psycopg:// uses the installed psycopg"
            ) from None
        return value

    @model_validator(mode="after")
    def _auth_protects_something(self) -> Settings:
        """Refuse auth settings that look set but protect nothing: an empty token accepted
        ``Bearer `` with nothing after it, a user without a password let anyone who knew the
        name in, and a password without a user turned no check on at all.

        An empty auth variable is refused, not read as unset like other empty variables: it
        looks like auth was meant, and unset it serves without any."""
        token = _secret_or_empty(self.auth_token, "BOXLOOP_AUTH_TOKEN")
        if token is not None and not token.strip():
            raise ValueError(
                "BOXLOOP_AUTH_TOKEN is set but empty: give a token, or unset it to serve "
                "without one"
            )
        user = self.basic_auth_user
        if user is None and _empty_in_environment("BOXLOOP_BASIC_AUTH_USER"):
            user = ""
        password = _secret_or_empty(self.basic_auth_password, "BOXLOOP_BASIC_AUTH_PASSWORD")
        if (user is None) != (password is None) or (user is not None and not user.strip()):
            raise ValueError(
                "basic auth needs both BOXLOOP_BASIC_AUTH_USER and BOXLOOP_BASIC_AUTH_PASSWORD, "
                "the user not empty: set both, or neither to serve without basic auth"
            )
        if password is not None and not password:
            raise ValueError(
                "BOXLOOP_BASIC_AUTH_PASSWORD is set but empty: anyone who knows the user name "
                "would pass; give a password"
            )
        return self

    @model_validator(mode="after")
    def _epoch_clamp_in_order(self) -> Settings:
        """``[yolox_min_epochs, yolox_max_epochs]`` must be a range: the other way round was
        accepted here and then failed every training job (``YoloxTrainConfig`` refuses it)."""
        if self.yolox_min_epochs > self.yolox_max_epochs:
            raise ValueError(
                f"BOXLOOP_YOLOX_MIN_EPOCHS ({self.yolox_min_epochs}) is above "
                f"BOXLOOP_YOLOX_MAX_EPOCHS ({self.yolox_max_epochs})"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'boxloop.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def features_dir(self) -> Path:
        return self.data_dir / "features"

    @property
    def fetched_onnx_model_path(self) -> Path:
        """Where ``boxloop models fetch`` installs the COCO YOLOX-Nano model."""
        return self.models_dir / "yolox_nano_coco" / "yolox_nano.onnx"

    @property
    def resolved_onnx_model_path(self) -> Path | None:
        """The ONNX model that pre-annotates before training: ``onnx_model_path`` when set,
        else the fetched model in the data dir if present, else ``None``."""
        if self.onnx_model_path is not None:
            return self.onnx_model_path
        fetched = self.fetched_onnx_model_path
        return fetched if fetched.is_file() else None

    @property
    def resolved_onnx_class_names_path(self) -> Path | None:
        """The class names of :attr:`resolved_onnx_model_path`'s outputs:
        ``onnx_class_names_path`` when set, else ``coco_classes.txt`` beside the model; ``None``
        without a model.

        The one place that decides it, for serving and training alike: training read the file
        beside the model whatever the setting said, so it failed where serving worked, or copied
        the wrong COCO rows into the class head from a file beside the model in another order.
        """
        model = self.resolved_onnx_model_path
        if model is None:
            return None
        return self.onnx_class_names_path or Path(model).parent / "coco_classes.txt"


#: The log levels both Python's ``logging`` and uvicorn know (``warn`` and ``fatal`` are only
#: logging's, ``trace`` only uvicorn's).
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _empty_in_environment(name: str) -> bool:
    """Whether the variable ``name`` is set to the empty string (matched as pydantic-settings
    matches names: in any case)."""
    return any(key.upper() == name and value == "" for key, value in os.environ.items())


def _secret_or_empty(secret: SecretStr | None, variable: str) -> str | None:
    """The secret's value; ``""`` when it is unset only because ``variable`` is empty."""
    if secret is not None:
        return secret.get_secret_value()
    return "" if _empty_in_environment(variable) else None


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the file, key or variable, and why."""

    @classmethod
    def from_validation(
        cls, exc: ValidationError, settings_of: Mapping[str, str] | None = None
    ) -> SettingsError:
        """One line naming each failing setting and its variable. ``settings_of`` maps a field
        of the validated model to the setting it came from (default: the same name)."""
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            if not loc:
                problems.append(error["msg"])
                continue
            loc[0] = (settings_of or {}).get(loc[0], loc[0])
            problems.append(f"{'.'.join(loc)} (BOXLOOP_{loc[0].upper()}): {error['msg']}")
        return cls("invalid settings: " + "; ".join(problems))


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings: config file values < environment variables < explicit overrides.

    Raises :class:`SettingsError` for a file that cannot be read, is not a YAML mapping or holds
    a key that is no setting (a typo would otherwise be ignored without a word), and for a value
    of the wrong type, from the file or from a ``BOXLOOP_*`` variable.
    """
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get("BOXLOOP_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"cannot read the settings file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise SettingsError(
                f"settings file {path} must hold a mapping, got {type(loaded).__name__}"
            )
        unknown = sorted(str(k) for k in set(loaded) - set(Settings.model_fields))
        if unknown:
            raise SettingsError(
                f"settings file {path}: no such setting: {', '.join(unknown)} "
                "(the keys are the BOXLOOP_* names in lower case, without the prefix)"
            )
        # an empty variable is unset (Settings' env_ignore_empty): the file's value stands
        file_values = {
            k: v for k, v in loaded.items() if not os.environ.get(f"BOXLOOP_{k.upper()}")
        }
    try:
        return Settings(**{**file_values, **overrides})
    except ValidationError as exc:
        raise SettingsError.from_validation(exc) from exc


def settings_to_json(settings: Settings, **overrides: Any) -> str:
    """The whole settings object as JSON, secrets included, for :func:`settings_from_json`.

    How the server hands its settings (file, environment, overrides: already merged) to the
    training child process, which must train with exactly what the server serves with. The text
    holds secrets: write it only where the server's own user can read it.
    """
    values: dict[str, Any] = {}
    for name, value in {**dict(settings), **overrides}.items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        values[name] = value
    return json.dumps(values, default=str)


def settings_from_json(text: str) -> Settings:
    """Settings exactly as :func:`settings_to_json` wrote them (the environment is not read)."""
    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError("settings JSON must hold an object")
    return Settings.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
