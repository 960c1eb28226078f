"""Task specs: one YAML file describes a distillation task end to end.

``load_spec(path)`` reads and validates the file and returns a frozen ``TaskSpec``. Every
problem raises ``distiller.errors.SpecError`` naming the file, the dotted key
(``student.lora.rank``), what was expected and the YAML line. Unknown keys are errors (with a
"did you mean"). Relative file paths resolve against the spec's directory. A minimal spec::

    name: my_task
    prompts: {file: my_task/curriculum.yaml, template: "Explain: {text}"}
    teacher: {model: smollm2-135m-instruct}
    validators: [{type: regex, must_match: ["^ANSWER:"]}]

Everything else has a default; see the dataclasses in ``schema.py`` for each section's keys.

Prompts (``prompts:``, each of ``eval.prompt_sets``, and ``eval.dev``) are a file path, an
inline list, or a mapping ``{file | items, template, field, vary}``. Entries are strings or
mappings. A string entry is exposed to the template as ``{<field>}`` (``field`` defaults to
``text``); a mapping entry's keys are all template fields, except the reserved ``id``,
``label``, ``reference`` and ``meta``. Templates take plain ``{field}`` placeholders only
(``{{`` and ``}}`` for literal braces): no attribute access, index, conversion or format spec.
Without a template the entry's ``<field>`` is the prompt. ``vary: {k: [v1, v2]}`` expands every
entry once per combination of values (a product). Ids are given (``id``) or a hash of the text.
Prompt sets given as a bare path inherit the main template; give ``template: null`` to opt out.
"""

from __future__ import annotations

from distiller.decoding import Decoding
from distiller.hashing import stable_hash
from distiller.spec.prompts import read_prompts
from distiller.spec.schema import (
    LORA_KEYS,
    ROUTES,
    TEACHER_DECODING,
    DPOSpec,
    DropLayersSpec,
    EndpointSpec,
    EvalSpec,
    FewShot,
    KDSpec,
    LogitCacheSpec,
    LoraSpec,
    Prompt,
    QuantizeSpec,
    SplitSpec,
    StudentSpec,
    TaskSpec,
    TeacherSpec,
    TrainSpec,
    ValidatorSpec,
)
from distiller.spec.sections import load_spec

__all__ = [
    "LORA_KEYS",
    "ROUTES",
    "TEACHER_DECODING",
    "DPOSpec",
    "Decoding",
    "DropLayersSpec",
    "EndpointSpec",
    "EvalSpec",
    "FewShot",
    "KDSpec",
    "LogitCacheSpec",
    "LoraSpec",
    "Prompt",
    "QuantizeSpec",
    "SplitSpec",
    "StudentSpec",
    "TaskSpec",
    "TeacherSpec",
    "TrainSpec",
    "ValidatorSpec",
    "load_spec",
    "read_prompts",
    "stable_hash",
]
