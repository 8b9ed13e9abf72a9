"""What a training method is: the contract between a method module and the trainer.

A method is one class in one module of ``alignment/methods/`` (torchtune's
habit: the recipe is generic, the method is chosen by config). It declares

* ``Options``: its own settings, given as ``training.method_options``;
* ``uses_reference``: whether training needs the frozen reference model;
* ``pair_inputs``: the per-pair tensors it reads from the ``TrainingInputs``
  bundle (made by its data step), checked before training starts;
* ``pipeline_parameters``: the extra pipeline parameters its data steps take
  (SmPO: the reward model and the smoothing); the steps themselves are wired
  by ``training_inputs`` in ``pipelines/methods/<name>.py`` (no such module:
  the encoded pairs are all it needs);
* ``loss(step, batch)``: its loss on one micro-batch, from the per-sample
  errors the ``TrainingStep`` computes;
* optionally ``batch_source``: which pairs make up a batch (random by default),
  and ``sharded_batch_source``: the same over streamed shards;
* ``prepare_inputs``: the same bundle its pipeline steps make, built in one
  call without ZenML (what benchmarks and scripts use; the pipeline runs the
  same library functions as separate, cached steps).

The trainer only ever calls these; it never asks a method its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from alignment.inputs import BatchSource, RandomBatches, TrainingInputs, as_training_inputs
from alignment.losses import LossOutput

if TYPE_CHECKING:
    import pandas as pd

    from alignment.batching import PairBatch
    from alignment.encoding import EncodedPairs
    from alignment.models import DiffusionComponents
    from alignment.train import TrainingStep
    from alignment.train_config import TrainConfig


class NoOptions(BaseModel):
    """A method without settings of its own."""

    model_config = ConfigDict(extra="forbid")


class PreferenceMethod:
    """Base class of the training methods; a subclass per module, registered by its ``name``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    uses_reference: ClassVar[bool] = True
    pair_inputs: ClassVar[tuple[str, ...]] = ()
    pipeline_parameters: ClassVar[dict[str, type[BaseModel]]] = {}

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.options = self.Options.model_validate(config.method_options)

    @property
    def metric_prefix(self) -> str:
        """Metrics are namespaced ``loss/<name>``, ``<name>/implicit_acc``, ..."""
        return self.name

    def check_inputs(self, inputs: TrainingInputs) -> None:
        """Refuse, before training starts, a bundle that lacks what this method reads."""
        inputs.require(self.name, self.pair_inputs)

    def batch_source(self, inputs: TrainingInputs) -> BatchSource:
        return RandomBatches(num_pairs=len(inputs), seed=self.config.seed)

    def sharded_batch_source(self, inputs: TrainingInputs, shard_order: BatchSource) -> BatchSource:
        """The order over streamed shards (``alignment.streaming``); ``shard_order`` is the shard-aware random one.

        A method that plans its own batches must say how it plans them over
        shards (a plan over the whole data set would read every shard at
        every step); one that does not is refused by name.
        """
        if type(self).batch_source is not PreferenceMethod.batch_source:
            raise ValueError(
                f"method {self.name!r} plans its own batches but has no plan over sharded data "
                "(PreferenceMethod.sharded_batch_source)"
            )
        return shard_order

    @classmethod
    def validated_parameters(cls, parameters: dict) -> dict[str, BaseModel]:
        """This method's ``pipeline_parameters`` read from a pipeline's ``parameters`` mapping."""
        return {name: model(**parameters[name]) for name, model in cls.pipeline_parameters.items()}

    def prepare_inputs(
        self,
        pairs: pd.DataFrame,
        encoded: EncodedPairs,
        components: DiffusionComponents,
        parameters: dict[str, BaseModel],
    ) -> tuple[TrainingInputs, dict]:
        """The training bundle and a few statistics of how it was made.

        Args:
            pairs: Winner-first pairs (``alignment.data.prepare_pairs``), in the order of ``encoded``.
            encoded: Their cached latents and prompt embeddings.
            components: The base model (the reference, for methods that precompute with it).
            parameters: This method's ``pipeline_parameters``, validated.
        """
        return as_training_inputs(encoded), {}

    def loss(self, step: TrainingStep, batch: PairBatch) -> LossOutput:
        raise NotImplementedError
