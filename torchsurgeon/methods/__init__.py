"""Interpretability methods, each a few lines for the user and a rewrite underneath.

Every method here takes a ``transformers`` causal LM (plain or already wrapped) or an
explicit model from ``ts.load`` / ``ts.convert`` (the same results, to float rounding) and
does its work with selectors and intervention layers — ``Save``, ``SaveGrad``, ``Patch``,
``Noise``, ``Zero``, ``MeanAblate``, ``SetValues``, ``Add``, ``LowRankAdapter`` — never with
hand-written hooks, so each experiment is also a model (or a set of models) that could be
saved as a plan. Where a method needs the parts of a model (blocks, final norm, unembedding,
the attention output projection that heads are read from) it finds them in the one family
table of :mod:`torchsurgeon.models.families` (see :mod:`~torchsurgeon.methods.layout`) or
takes ``layout=ModelLayout(...)``.

Padded batches: every method takes the batch's ``attention_mask`` (pairs of prompts share
one; a method of two independent batches takes one mask for each) and then reads each row
at its own positions — ``-1`` is a row's last real token, left or right padding alike —
averages over real tokens only, and calls the model with position ids that skip padding,
so a padded row gives what the prompt gives alone (see :mod:`~torchsurgeon.methods.tokens`).

==========================  ====================================================  ==============
method                      question                                              returns
==========================  ====================================================  ==============
``logit_lens``              what does each layer already predict?                 ``LogitLens``
``steer``                   generate with a vector added to the residual stream  ``Steering``
``activation_patching``     which sites carry the clean/corrupted difference?    ``EffectGrid``
``attribution_patching``    the same, estimated from one forward + one backward  ``EffectGrid``
``causal_tracing``          where is a subject's fact recalled?                  ``EffectGrid``
``head_knockout``           what does silencing each head cost?                  ``EffectGrid``
``force_neurons``           what happens when chosen MLP neurons are forced?     ``NeuronForcing``
``train_probe``             where is a property linearly readable?               ``ProbeResult``
``train_lora``              a low-rank adapter on a frozen, shared base          ``LoraResult``
==========================  ====================================================  ==============

On a host: every method takes ``backend=`` (a ``ts.remote.Client``; the model may be
``client.meta(name)``) and runs its passes there — one request for a sweep that is one
batch — with known metrics computed on the host (see :mod:`~torchsurgeon.methods.remote`):
``attribution_patching``'s backward pass, ``steer``'s generation and ``train_lora``'s
training loop too, each in one request; ``train_probe(fit_on_host=True)`` fits its probes
there as well.

Plots live in :mod:`torchsurgeon.methods.plots` (matplotlib, loaded on first use); the toy
induction model in :mod:`torchsurgeon.methods.toy`.
"""

from __future__ import annotations

from typing import Any

from torchsurgeon.methods.attribution import attribution_patching
from torchsurgeon.methods.grid import EffectGrid
from torchsurgeon.methods.knockout import head_knockout, head_means, knockout_heads
from torchsurgeon.methods.layout import FAMILIES, ModelLayout, UnknownFamilyError, layout_of
from torchsurgeon.methods.lens import LogitLens, logit_lens
from torchsurgeon.methods.lora import LoraResult, train_lora
from torchsurgeon.methods.metrics import AnswerProbability, LogitDiff, Metric, on_real_tokens
from torchsurgeon.methods.neurons import NeuronForcing, force_neurons
from torchsurgeon.methods.patching import activation_patching
from torchsurgeon.methods.probing import (
    Probe,
    ProbeResult,
    fit_probe,
    residual_features,
    train_probe,
)
from torchsurgeon.methods.saving import run_saving, saving_sites
from torchsurgeon.methods.steering import Steering, steer, steering_model, steering_vector
from torchsurgeon.methods.tracing import causal_tracing, embedding_noise_std

__all__ = [
    "FAMILIES",
    "AnswerProbability",
    "EffectGrid",
    "LogitDiff",
    "LogitLens",
    "LoraResult",
    "Metric",
    "ModelLayout",
    "NeuronForcing",
    "Probe",
    "ProbeResult",
    "Steering",
    "UnknownFamilyError",
    "activation_patching",
    "attribution_patching",
    "causal_tracing",
    "embedding_noise_std",
    "fit_probe",
    "force_neurons",
    "head_knockout",
    "head_means",
    "knockout_heads",
    "layout_of",
    "logit_lens",
    "on_real_tokens",
    "residual_features",
    "run_saving",
    "saving_sites",
    "steer",
    "steering_model",
    "steering_vector",
    "train_lora",
    "train_probe",
]


def __getattr__(name: str) -> Any:
    """``methods.plots`` and ``methods.toy`` load on first use (matplotlib; the toy trainer)."""
    if name in ("plots", "toy"):
        import importlib

        return importlib.import_module(f"torchsurgeon.methods.{name}")
    raise AttributeError(f"module 'torchsurgeon.methods' has no attribute {name!r}")
