"""The vision-language critic: a transformers image-text-to-text model critiques each image against its prompt.

:class:`VLMCritic` fills a prompt template (``templates/critique.txt``) with the
image's prompt, lets the model answer about the image, and parses the answer
with :func:`~alignment.richpo.critique.parse_critique`. With an instruction
template (``templates/instructions.txt``) a second call turns the critique into
short edit instructions, one change each; without one, the first answer must
hold both. Malformed output is retried (sampling, a new seed), then recorded as
a failure with its reason: :meth:`VLMCritic.critique` never raises for one
image's sake.

The model sits behind :class:`TextGenerator` (``(images, texts) -> texts``):
:class:`TransformersGenerator` is the real one, a test injects a scripted one.
Everything is loaded offline (:meth:`VLMCritic.load`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from alignment.config import resolve_device, torch_dtype
from alignment.models.locate import find_local_model
from alignment.models.spec import ModelNotAvailableError
from alignment.richpo.config import CriticConfig
from alignment.richpo.critique import (
    _LIST_MARKER,
    Critique,
    CritiqueError,
    CritiqueOutcome,
    parse_critique,
    parse_instructions,
)

__all__ = [
    "TEMPLATE_DIR",
    "PromptTemplate",
    "TemplateError",
    "TextGenerator",
    "TransformersGenerator",
    "VLMCritic",
    "instructions_from_text",
    "load_template",
    "resolve_device_and_dtype",
]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
RETRY_MIN_TEMPERATURE = 0.7
"""Retries sample at least this hot: a greedy failure repeated identically would waste the retry."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CRITIQUE_PLACEHOLDERS = ("prompt",)
_INSTRUCTION_PLACEHOLDERS = ("prompt", "critique")
_NO_VLM_HINT = "Set richpo.critic.backend to 'toy' to run without a vision-language model."


class TemplateError(ValueError):
    """A prompt template without a placeholder it needs, or with one nobody fills."""


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``"auto"`` device: cuda if available, else cpu; ``"auto"`` dtype: bf16 (else fp16) on cuda, float32 on cpu."""
    resolved = resolve_device(device)
    if dtype != "auto":
        return resolved, torch_dtype(dtype)
    if resolved.type == "cuda":
        return resolved, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return resolved, torch.float32


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template file with ``{name}`` placeholders (other braces, e.g. a JSON example, are left alone)."""

    path: Path
    text: str

    def render(self, **values: str) -> str:
        # One pass: a value that itself contains "{critique}" is inserted verbatim, not filled again.
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.text)


def load_template(name_or_path: str, placeholders: Sequence[str]) -> PromptTemplate:
    """Read a template by name from ``TEMPLATE_DIR``, else as a path; it must use exactly ``placeholders``.

    Raises:
        FileNotFoundError: Naming the places looked at.
        TemplateError: Naming the file and the missing or unknown placeholder.
    """
    bundled = TEMPLATE_DIR / name_or_path
    given = Path(name_or_path).expanduser()
    path = bundled if bundled.is_file() else given
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt template '{name_or_path}' not found: neither {bundled} nor {given.resolve()} is a file."
        )
    text = path.read_text(encoding="utf-8")
    used = set(_PLACEHOLDER.findall(text))
    missing = [name for name in placeholders if name not in used]
    if missing:
        raise TemplateError(
            f"Prompt template {path} lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}."
        )
    unknown = sorted(used - set(placeholders))
    if unknown:
        raise TemplateError(
            f"Prompt template {path} uses unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
            f"it is filled with {', '.join('{' + p + '}' for p in placeholders)} only."
        )
    return PromptTemplate(path=path, text=text)


class TextGenerator(Protocol):
    """One batch of (image, user text) -> the model's answers; ``identity`` names the model for the fingerprint."""

    identity: str

    def __call__(
        self, images: Sequence[Image.Image], texts: Sequence[str], *, temperature: float, seed: int
    ) -> list[str]: ...


class TransformersGenerator:
    """A transformers image-text-to-text model and its processor as a :class:`TextGenerator`.

    The user text goes through the processor's chat template (one user turn: the
    image, then the text) when it has one, else it is prefixed with the image
    token. Decoder-only models are padded on the left so that every answer
    starts right after its prompt. ``temperature`` 0 decodes greedily; above 0
    it samples, seeded by ``seed`` in a forked RNG (the caller's RNG is left
    alone).
    """

    def __init__(self, model: Any, processor: Any, *, max_new_tokens: int) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self._encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            if not self._encoder_decoder:
                tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        self.identity = f"{type(model).__name__}:{str(self.dtype).removeprefix('torch.')}"

    def render(self, text: str) -> str:
        """The model's input text for one image and the user text."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None)
        return f"{image_token}\n{text}" if image_token else text

    def _generation_config(self, temperature: float) -> Any:
        # A copy of the model's own settings (eos ids, top_p for sampling) with ours on top.
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        if temperature > 0:
            config.do_sample, config.temperature = True, temperature
        else:
            # Unset the sampling knobs, or generate() warns that a greedy run ignores them.
            config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if config.pad_token_id is None and tokenizer is not None:
            config.pad_token_id = tokenizer.pad_token_id
        return config

    @torch.inference_mode()
    def __call__(
        self, images: Sequence[Image.Image], texts: Sequence[str], *, temperature: float, seed: int
    ) -> list[str]:
        inputs = self.processor(
            # One list per sample: the processors of multi-image models (Idefics3, Mllama) need it, Llava's accept it.
            images=[[image.convert("RGB")] for image in images],
            text=[self.render(text) for text in texts],
            padding=True,
            return_tensors="pt",
        ).to(self.device, dtype=self.dtype)  # the dtype applies to floating tensors (pixels) only
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = self.model.generate(**inputs, generation_config=self._generation_config(temperature))
        answers = output if self._encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(answers, skip_special_tokens=True)


@dataclass
class _Item:
    """One image's progress through the attempts."""

    critique: Critique | None = None  # the parsed first answer, kept while the instruction call is retried
    critique_text: str = ""
    outcome: CritiqueOutcome | None = None
    failure: str | None = None
    raw: str = ""
    attempts: int = 0


def _json_values(text: str) -> list[Any]:
    """Every JSON object or list that starts at a ``{`` or ``[`` of ``text``, in order (trailing text ignored)."""
    decoder = json.JSONDecoder()
    values = []
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        values.append(value)
    return values


def instructions_from_text(text: str) -> tuple[str, ...]:
    """Edit instructions from the instruction call's answer.

    A JSON list (of strings or ``{"instruction": ...}`` objects) or an object
    with an ``instructions`` / ``edits`` list wins; else a bullet or numbered
    list; else every line (a plain one-line answer is one instruction).
    """
    for value in _json_values(text):
        if isinstance(value, dict):
            value = value.get("instructions", value.get("edits"))
        if isinstance(value, list) and value and all(isinstance(item, str | dict) for item in value):
            found = parse_instructions(value)
            if found:
                return found
    lines = [line for line in text.splitlines() if line.strip() and not line.strip().startswith("```")]
    listed = [line for line in lines if _LIST_MARKER.match(line)]
    return parse_instructions("\n".join(listed or lines))


class VLMCritic:
    """A :class:`~alignment.richpo.critique.Critic` backed by a vision-language model.

    Args:
        config: The critic's settings (templates, retries, temperature, seed, batch size, min severity).
        generator: The model (:class:`TransformersGenerator`, or any :class:`TextGenerator`).
        source: What the model is (hub id or path) for ``name`` and the fingerprint; default ``config.source``.
        revision: The cached snapshot's commit when ``source`` is a hub id.

    Issues below ``config.min_severity`` get no edit instruction: an image whose
    issues are all minor gets a critique with no instructions (no second call),
    and the instruction call only sees the serious issues.
    """

    def __init__(
        self,
        config: CriticConfig,
        generator: TextGenerator,
        *,
        source: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.config = config
        self.generator = generator
        self.source = source or config.source or "unnamed"
        self.revision = revision
        self.critique_template, self.instruction_template = _templates(config)
        self.name = f"vlm:{self.source}"

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides the critiques: model, templates and generation settings."""
        settings = {
            "source": self.source,
            "revision": self.revision,
            "model": getattr(self.generator, "identity", type(self.generator).__name__),
            "critique_template": self.critique_template.text,
            "instruction_template": None if self.instruction_template is None else self.instruction_template.text,
            # batch_size: a sampled answer depends on its batch (one seed per batch, padding).
            **self.config.model_dump(
                include={"max_new_tokens", "temperature", "retries", "min_severity", "seed", "batch_size"}
            ),
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, config: CriticConfig) -> VLMCritic:
        """Load ``config.source`` (a local directory, or a hub id already in the HF cache) without network.

        Raises:
            ValueError: If ``config`` is not a VLM critic's.
            FileNotFoundError, TemplateError: If a prompt template is missing or wrong.
            ModelNotAvailableError: If the model is not on this machine or is not an image-text-to-text model.
        """
        if config.backend != "vlm":
            raise ValueError(f"VLMCritic.load needs critic.backend 'vlm', got {config.backend!r}")
        if not config.source:
            raise ValueError("critic.source must name the vision-language model (a hub id in the cache or a path)")
        _templates(config)  # a wrong template fails before any weights are read
        from transformers import AutoModelForImageTextToText, AutoProcessor

        directory = find_local_model(config.source, what="vision-language critic", hint=_NO_VLM_HINT)
        from_cache = not Path(config.source).expanduser().exists()
        device, dtype = resolve_device_and_dtype(config.device, config.dtype)
        try:
            processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(directory, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as error:
            raise ModelNotAvailableError(
                f"The vision-language critic '{config.source}' ({directory}) cannot be loaded as an "
                f"image-text-to-text model with its processor: {error} {_NO_VLM_HINT}"
            ) from error
        generator = TransformersGenerator(model.to(device), processor, max_new_tokens=config.max_new_tokens)
        return cls(config, generator, source=config.source, revision=directory.name if from_cache else None)

    def _seed(self, index: int, attempt: int, stage: str) -> int:
        key = f"{self.config.seed}:{index}:{attempt}:{stage}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")

    def _generate(
        self, indices: list[int], images: Sequence[Image.Image], texts: list[str], *, attempt: int, stage: str
    ) -> list[str | Exception]:
        """Answers for ``indices`` in batches; a failing batch is rerun one by one so one bad item fails alone."""
        temperature = self.config.temperature if attempt == 0 else max(self.config.temperature, RETRY_MIN_TEMPERATURE)
        results: list[str | Exception] = []
        size = self.config.batch_size
        for start in range(0, len(indices), size):
            chunk, chunk_texts = indices[start : start + size], texts[start : start + size]
            try:
                answers = self.generator(
                    [images[i] for i in chunk],
                    chunk_texts,
                    temperature=temperature,
                    seed=self._seed(chunk[0], attempt, stage),
                )
                if len(answers) != len(chunk):
                    raise RuntimeError(f"the model gave {len(answers)} answers for {len(chunk)} images")
                results.extend(answers)
            except Exception as error:  # any model error is one item's failure, never the run's
                if len(chunk) == 1:
                    results.append(error)
                    continue
                for index, text in zip(chunk, chunk_texts, strict=True):
                    try:
                        results.append(
                            self.generator(
                                [images[index]],
                                [text],
                                temperature=temperature,
                                seed=self._seed(index, attempt, stage),
                            )[0]
                        )
                    except Exception as item_error:
                        results.append(item_error)
        return results

    def _serious(self, critique: Critique) -> Critique:
        return Critique(
            issues=tuple(issue for issue in critique.issues if issue.severity >= self.config.min_severity),
            instructions=critique.instructions,
        )

    def critique(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[CritiqueOutcome]:
        """One outcome per image: a critique, or the failure reason after ``1 + retries`` attempts."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        items = [_Item() for _ in images]
        two_calls = self.instruction_template is not None
        for attempt in range(self.config.retries + 1):
            pending = [index for index, item in enumerate(items) if item.outcome is None]
            if not pending:
                break
            for index in pending:
                items[index].attempts = attempt + 1
            first = [index for index in pending if items[index].critique is None]
            texts = [self.critique_template.render(prompt=prompts[index]) for index in first]
            for index, answer in zip(
                first, self._generate(first, images, texts, attempt=attempt, stage="critique"), strict=True
            ):
                self._take_critique(items[index], answer, two_calls)
            if not two_calls:
                continue
            second = [index for index in pending if items[index].outcome is None and items[index].critique is not None]
            assert self.instruction_template is not None
            texts = [
                self.instruction_template.render(
                    prompt=prompts[index], critique=self._serious(items[index].critique).to_json()
                )
                for index in second
            ]
            for index, answer in zip(
                second, self._generate(second, images, texts, attempt=attempt, stage="instructions"), strict=True
            ):
                self._take_instructions(items[index], answer)
        return [
            item.outcome
            or CritiqueOutcome(
                critique=None, failure=item.failure or "critic_error", attempts=item.attempts, raw=item.raw
            )
            for item in items
        ]

    def _take_critique(self, item: _Item, answer: str | Exception, two_calls: bool) -> None:
        if isinstance(answer, Exception):
            item.failure, item.raw = "critic_error", f"{type(answer).__name__}: {answer}"
            return
        item.raw = answer
        try:
            critique = parse_critique(answer, require_instructions=False)
        except CritiqueError as error:
            item.failure = error.reason
            return
        if not self._serious(critique).issues:
            # Nothing worth an edit: a valid critique without instructions, whatever the model suggested.
            item.outcome = CritiqueOutcome(Critique(critique.issues, ()), attempts=item.attempts, raw=answer)
        elif two_calls:
            item.critique, item.critique_text = critique, answer
        elif critique.instructions:
            item.outcome = CritiqueOutcome(critique, attempts=item.attempts, raw=answer)
        else:
            item.failure = "no_instructions"

    def _take_instructions(self, item: _Item, answer: str | Exception) -> None:
        assert item.critique is not None
        if isinstance(answer, Exception):
            item.failure, item.raw = "critic_error", f"{type(answer).__name__}: {answer}"
            return
        raw = f"{item.critique_text}\n\n[instructions]\n{answer}"
        item.raw = raw
        instructions = instructions_from_text(answer)
        if not instructions:
            item.failure = "no_instructions"
            return
        item.outcome = CritiqueOutcome(
            Critique(issues=item.critique.issues, instructions=instructions), attempts=item.attempts, raw=raw
        )


def _templates(config: CriticConfig) -> tuple[PromptTemplate, PromptTemplate | None]:
    critique = load_template(config.critique_template, _CRITIQUE_PLACEHOLDERS)
    if config.instruction_template is None:
        return critique, None
    return critique, load_template(config.instruction_template, _INSTRUCTION_PLACEHOLDERS)
