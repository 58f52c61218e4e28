"""The ``handler`` section of ``model-config.yaml``: what the emotion handler runs and how.

Read once per worker (``EmotionHandler.initialize``) and once when the archive is built, so a bad
section fails the build instead of every worker.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# The precisions each backend runs; ``emotion_backends.BACKENDS`` holds one class per name.
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {"torch": ("fp32", "bf16", "int8"), "onnx": ("fp32", "int8")}
# Settings that apply to one backend only.
BACKEND_ONLY = {"compile": "torch", "spin_wait": "onnx", "fuse": "onnx"}


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler`` section of ``model-config.yaml``; every key is optional.

    Attributes:
        backend: ``torch`` (PyTorch eager) or ``onnx`` (ONNX Runtime on the graph exported by
            ``serving.archive``). On a GPU the torch backend always runs, in fp16.
        precision: ``fp32``, ``bf16`` (AMX on CPUs that have it, torch only) or ``int8`` (dynamic
            quantisation: torch quantises every Linear layer per tensor at load time, the ONNX
            export quantises MatMul weights per output channel at archive time).
        max_length: The model's window in tokens; default the model directory's tokenizer setting.
        long_texts: What a text longer than the window gets: ``truncate`` (its first
            ``max_length`` tokens are classified, and the answer says ``"truncated": true``) or
            ``chunk`` (it is cut into windows of ``max_length`` tokens, each sharing
            ``chunk_overlap`` tokens with the one before, at most ``max_chunks`` of them; the
            answer is the mean of the windows' probabilities, ``truncated`` only when there
            were more windows than that). The mean is weighted by the tokens each window adds, so
            every token counts once (``emotion_batch.mean_of_windows``). Needs a fast tokenizer
            (``tokenizer.json``).
        chunk_overlap: Tokens a window shares with the one before it (``chunk``).
        max_chunks: The most windows one text is run as (``chunk``): it bounds a text's cost.
        max_text_chars: Longest accepted text; longer ones get a 413.
        threads: Intra-op threads per worker (torch, or ONNX Runtime's pool); ``0``: torch's
            default (``OMP_NUM_THREADS``, else the CPUs the process may run on), capped at the
            container's CPU limit (``emotion_cpuinfo.cgroup_cpu_limit``), which torch does not see.
        sort_by_length: Run the batch as several forward passes of texts of similar token length,
            chosen to minimise padded tokens plus ``pass_cost_tokens`` per pass
            (``emotion_batch.plan_passes``), instead of one pass padded to the longest text.
        pass_cost_tokens: The fixed cost of one forward pass, in tokens, for ``sort_by_length``.
        isolate_texts: Where the backend's answer to a text would depend on the other texts of
            its forward pass (int8 on the CPU: activations are quantised with one scale per pass),
            run each text in a pass of its own, so that every answer is the one the text gets
            alone, whatever else was batched with it. ``false`` shares passes: faster (1.5x the
            int8 forward throughput here), but a text's probabilities then move with its
            companions (by up to 0.43 on the default model). Backends whose answers do not depend
            on their companions (fp32, bf16) always share passes.
        spin_wait: Let ONNX Runtime's idle threads spin waiting for the next run (its default)
            instead of sleeping; pays off only on cores the worker does not share.
        fuse: Fuse the exported graph's transformer layers into ONNX Runtime's attention,
            LayerNorm and GELU kernels when the archive is built (``emotion_onnx.fuse_graph``;
            BERT-family models, others are exported unfused).
        compile: Wrap the model in ``torch.compile``; the handler compiles while loading, so worker
            start takes longer (about 85 s here) and no request waits for it.
        request_log: Append one JSON line per answered request to ``requests.jsonl`` (read by
            ``make drift``; see ``emotion_monitor.RequestLog``).
        request_log_dir: Folder of the request log; default TorchServe's log folder
            (``$LOG_LOCATION``, else ``logs`` in the server's working directory).
        request_log_max_bytes: Size at which the request log is rotated.
        request_log_backups: Rotated request logs kept; the log takes at most about
            ``(backups + 1) * max_bytes``.
        request_log_texts: ``true``: also log the raw texts (operator opt-in; off by default for
            privacy); ``hash``: only each text's SHA-256 (``text_sha256``); ``false``: neither.
        request_log_max_age_days: Days a request-log entry may be kept (0: no age limit).
        correct_typos: Replace each word that is one typo away from a known word by that word
            before tokenizing (``emotion_spelling``), where the model directory has the word list
            (``words.json``); ``false`` reads every text as written.
        abstain_below: Answer ``"label": null, "abstained": true`` (with every probability) when
            the top probability is below this; 0 never abstains. A request's
            ``X-Emotion-Abstain-Below`` header overrides it (``emotion_inputs.abstain_threshold``);
            ``metrics/<experiment>/risk_coverage.csv`` gives the coverage and accuracy of each value.
    """

    backend: str = "torch"
    precision: str = "fp32"
    max_length: int | None = None
    long_texts: str = "truncate"
    chunk_overlap: int = 32
    max_chunks: int = 8
    max_text_chars: int = 2000
    threads: int = 0
    sort_by_length: bool = False
    pass_cost_tokens: int = 16
    isolate_texts: bool = True
    compile: bool = False
    spin_wait: bool = False
    fuse: bool = False
    request_log: bool = True
    request_log_dir: str | None = None
    request_log_max_bytes: int = 20_000_000
    request_log_backups: int = 5
    request_log_texts: bool | str = False
    request_log_max_age_days: float = 30
    abstain_below: float = 0.0
    correct_typos: bool = True

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        """Build from the YAML section, rejecting unknown keys and values with a clear message."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler section: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**section)
        if settings.backend not in BACKEND_PRECISIONS:
            raise ValueError(f"handler.backend must be one of {tuple(BACKEND_PRECISIONS)}, not {settings.backend!r}")
        precisions = BACKEND_PRECISIONS[settings.backend]
        if settings.precision not in precisions:
            raise ValueError(
                f"handler.precision for the {settings.backend} backend must be one of {precisions}, "
                f"not {settings.precision!r}"
            )
        if settings.long_texts not in ("truncate", "chunk"):
            raise ValueError(f"handler.long_texts must be truncate or chunk, not {settings.long_texts!r}")
        if settings.chunk_overlap < 0 or settings.max_chunks < 1:
            raise ValueError("handler.chunk_overlap must be >= 0 and max_chunks >= 1")
        chunk = settings.long_texts == "chunk"
        if chunk and settings.max_length is not None and settings.chunk_overlap >= settings.max_length - 2:
            raise ValueError("handler.chunk_overlap must leave room for new tokens in each window (< max_length - 2)")
        if settings.threads < 0:
            raise ValueError(f"handler.threads must be >= 0 (0: the default), not {settings.threads}")
        if settings.pass_cost_tokens < 0:
            raise ValueError(f"handler.pass_cost_tokens must be >= 0, not {settings.pass_cost_tokens}")
        if settings.request_log_max_bytes <= 0 or settings.request_log_backups < 0:
            raise ValueError("handler.request_log_max_bytes must be > 0 and request_log_backups >= 0")
        if not isinstance(settings.request_log_texts, bool) and settings.request_log_texts != "hash":
            raise ValueError(
                f"handler.request_log_texts must be true, false or hash, not {settings.request_log_texts!r}"
            )
        if settings.request_log_max_age_days < 0:
            raise ValueError(f"handler.request_log_max_age_days must be >= 0, not {settings.request_log_max_age_days}")
        threshold = settings.abstain_below
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"handler.abstain_below must be a number from 0 to 1, not {settings.abstain_below!r}")
        for key, backend in BACKEND_ONLY.items():
            if getattr(settings, key) and settings.backend != backend:
                raise ValueError(f"handler.{key} applies to the {backend} backend only")
        return settings
