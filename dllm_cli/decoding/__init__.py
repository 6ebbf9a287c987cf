"""Block-diffusion decoding for LLaDA2.x: pure numpy policies driving a ``StepModel``, yielding typed events.

    config = make_config("speed", "2.1", presets=gguf_presets, max_tokens=256)
    for ev in generate(model, prompt_ids, config, detokenize=tok.decode):
        ...                                   # StartEvent, StepEvent*, BlockEvent*, DoneEvent
    result = collect(generate(model, prompt_ids, config))
"""
from dllm_cli.decoding.config import DecodeConfig, make_config, with_overrides
from dllm_cli.decoding.editing import JointPolicy, make_policy
from dllm_cli.decoding.engine import collect, generate
from dllm_cli.decoding.events import (
    BlockEvent, DoneEvent, Event, GenerationResult, StartEvent, StepEvent, event_from_dict,
)
from dllm_cli.decoding.sampling import Sampler, filtered_probs, make_sampler
from dllm_cli.decoding.stepper import ReferenceModel, ScriptedModel, StepModel, StepOutput, top2_from_logits
from dllm_cli.decoding.threshold import Policy, ThresholdPolicy, transfer_schedule

__all__ = [
    "DecodeConfig", "make_config", "with_overrides", "generate", "collect", "Event", "StartEvent", "StepEvent",
    "BlockEvent", "DoneEvent", "GenerationResult", "event_from_dict", "Sampler", "make_sampler", "filtered_probs",
    "StepModel", "StepOutput", "ScriptedModel", "ReferenceModel", "top2_from_logits", "Policy", "ThresholdPolicy",
    "JointPolicy", "make_policy", "transfer_schedule",
]
