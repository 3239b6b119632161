"""owl_lightning as an lmms-eval model: ``lmms-eval --model owl_lightning --model_args ckpt=RUN --tasks mme``.

Installed with the ``[lmms]`` extra and registered through the ``lmms_eval.models`` entry point
(setup.cfg), so lmms-eval finds it without a fork or a plugin variable. lmms-eval hands every request its
prompt text, its generation settings and a function that gives the document's images; the prompt goes
into the run's own conversation template with one ``<image>`` placeholder per image first, as in
training, and is answered by :class:`~owl_lightning.inference.OwlAssistant` (batched, KV cache).

Model arguments (``--model_args key=value,...``): ``ckpt`` (a checkpoint, a run folder or an export;
required), ``device`` (default: cuda when present), ``precision`` (``bf16``, ``fp16``, ``fp32``),
``max_new_tokens`` (when a task sets none), ``llm_source`` and ``trust_remote_code`` (what the
checkpoint itself may not choose, as the ``--llm-source`` / ``--trust-remote-code`` flags). lmms-eval's
own ``--batch_size`` and ``--device`` reach it too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from owl_lightning.data.health import SkipSample
from owl_lightning.inference import OwlAssistant, Request, Sampling

log = logging.getLogger(__name__)

MODEL_ID = "owl_lightning"


class OwlLightningModel(lmms):
    """An owl_lightning checkpoint answering lmms-eval's single-round requests about images and text:
    ``generate_until`` (batched generation) and ``loglikelihood`` (a continuation scored as the reply).
    Multi-round requests are refused with the reason, so a task that needs them fails at once."""

    is_simple = True

    def __init__(
        self,
        ckpt: str,
        device: str | None = None,
        precision: str = "auto",
        batch_size: int | str = 8,
        max_new_tokens: int = 128,
        llm_source: str | None = None,
        trust_remote_code: bool = False,
        **ignored,
    ) -> None:
        super().__init__()
        ignored = {name: value for name, value in ignored.items() if value is not None}
        if ignored:  # lmms-eval passes its own settings (e.g. max_batch_size) to every model
            log.info("owl_lightning ignores the lmms-eval model arguments %s", sorted(ignored))
        self.assistant = OwlAssistant.from_checkpoint(
            ckpt, device=device, precision=precision, llm_source=llm_source, trust_remote_code=trust_remote_code
        )
        self.batch_size_per_process = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self.too_long = 0  # requests whose prompt does not fit the model: answered "" or scored -inf

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        progress = tqdm(total=len(requests), desc="owl_lightning answering", disable=self.rank != 0)
        for chunk in _chunks(requests, self.batch_size_per_process):
            answers += self._answer_chunk(chunk)
            progress.update(len(chunk))
        progress.close()
        self._report_too_long()
        return answers

    def _answer_chunk(self, chunk: list[Instance]) -> list[str]:
        """One batch of requests → their answers, each cut at the first of its task's stop strings."""
        samples, samplings, stops, fitting = [], [], [], []
        for row, instance in enumerate(chunk):
            context, settings, doc_to_visual, doc_id, task, split = instance.args
            images = _images(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            try:
                samples.append(self.assistant.encode(Request.single(context, images)))
            except SkipSample:
                self.too_long += 1
                continue
            samplings.append(self._sampling(settings))
            stops.append(_stop_strings(settings))
            fitting.append(row)
        answers = [""] * len(chunk)
        if samples:
            for row, generation, until in zip(fitting, self.assistant.generate(samples, samplings), stops):
                answers[row] = _cut_at_first(self.assistant.decode(generation.tokens), until)
        return answers

    def _sampling(self, settings: dict) -> Sampling:
        """lmms-eval's generation settings (HF ``generate`` style) as a :class:`Sampling`."""
        sampled = settings.get("do_sample", False) and settings.get("temperature", 0) > 0
        return Sampling(
            max_new_tokens=int(settings.get("max_new_tokens") or self.default_max_new_tokens),
            temperature=float(settings["temperature"]) if sampled else 0.0,
            top_p=float(settings.get("top_p") or 1.0) if sampled else 1.0,
        )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each continuation scored as the assistant's reply to its context (the run's template; the end of
        the answer counted too, as ``owl-lightning eval --choice likelihood`` ranks options): ``(log-probability,
        whether greedy decoding gives it)``. A context too long for the model scores ``(-inf, False)``."""
        scores: list[tuple[float, bool]] = []
        for instance in tqdm(requests, desc="owl_lightning scoring", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = instance.args
            document = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(document)
            try:
                (score,) = self.assistant.reply_likelihoods(
                    Request.single(context, _images(doc_to_visual(document), task, doc_id)), [continuation]
                )
            except SkipSample:
                self.too_long += 1
                score = (float("-inf"), False)
            scores.append(score)
        self._report_too_long()
        return scores

    def _report_too_long(self) -> None:
        if self.too_long:
            log.warning("%d prompts so far were longer than the model takes (answered '' or scored -inf)", self.too_long)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("owl_lightning answers single-round lmms-eval tasks (output_type: generate_until)")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _images(visuals: list | None, task: str, doc_id: int) -> list[Image.Image]:
    """A document's visuals as PIL images; anything else (a video path, audio) is refused by name."""
    visuals = list(visuals or [])
    for visual in visuals:
        if not isinstance(visual, Image.Image):
            raise TypeError(
                f"task {task!r}, document {doc_id}: owl_lightning takes images, this task gives a {type(visual).__name__} "
                f"({str(visual)[:80]!r}); choose an image task"
            )
    return visuals


def _stop_strings(settings: dict) -> list[str]:
    until = settings.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _cut_at_first(answer: str, stops: list[str]) -> str:
    """``answer`` up to the first of ``stops`` it contains (stop strings end the answer, as in lmms-eval's own models)."""
    for stop in stops:
        if stop:
            answer = answer.split(stop, 1)[0]
    return answer


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's record of this model (a ``ModelManifest``)."""
    # Imported here: lmms_eval.models loads its entry points when first imported, and this module may be
    # what is being imported then.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{OwlLightningModel.__name__}")
