"""Chat-template knowledge: which tokens are prompt, which are the assistant's answer.

* :class:`ChatTemplate`: a format's training-time turn markers; :func:`describe` logs one.
* :func:`detect_template`: the registry entry that agrees with a tokenizer's template, or markers
  derived from its renders (``family="derived"``); :func:`register_template` adds a custom format.
* :func:`assistant_token_mask`: the exact per-token assistant mask of a conversation.
* :class:`RoleTagger`: role codes (``mask_monitor.stats.ROLE_*``) for a batch, on its device.
* :func:`resolve_template`: ``"auto"`` / ``"none"`` / a family name / a JSON-YAML file / a ChatTemplate.
* :class:`TemplateUnreadable`: a template that cannot be read, said in one line with what to pass.
"""

from mask_monitor.templates.assistant_mask import assistant_token_mask
from mask_monitor.templates.chat_template import ChatTemplate, describe
from mask_monitor.templates.derive import derive_template
from mask_monitor.templates.detect import REGISTER_HINT, TemplateUnreadable, detect_template, why_unreadable
from mask_monitor.templates.registry import REGISTRY, families, lookup, register_template, unregister_template
from mask_monitor.templates.roles import RoleTagger
from mask_monitor.templates.spec import TemplateSpecError, resolve_template, template_from_file

__all__ = [
    "ChatTemplate",
    "describe",
    "detect_template",
    "derive_template",
    "register_template",
    "unregister_template",
    "lookup",
    "families",
    "REGISTRY",
    "assistant_token_mask",
    "RoleTagger",
    "TemplateUnreadable",
    "why_unreadable",
    "REGISTER_HINT",
    "template_from_file",
    "resolve_template",
    "TemplateSpecError",
]
