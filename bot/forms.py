"""Slack modals generated from a module's parameters, and reading their submissions back.

Widgets follow the parameter kind; where Slack's limits forbid a widget (radio buttons and checkboxes
take at most 10 options, selects 100) the form falls back to the next best one.
"""

from __future__ import annotations

import json
from typing import Any

from ombot.modules import ModuleSpec, Param, ParamError

CALLBACK_ID = "om_run"
TARGETS_BLOCK = "targets"
VALUE_ACTION = "v"
RADIO_MAX, CHECKBOX_MAX, SELECT_MAX = 10, 10, 100


def _plain(text: str, limit: int = 75) -> dict[str, Any]:
    return {"type": "plain_text", "text": text[:limit] or " "}


def _option(value: str) -> dict[str, Any]:
    return {"text": _plain(value), "value": value}


def block_id(name: str) -> str:
    return f"p:{name}"


def build_view(spec: ModuleSpec, idc: str, channel: str, targets: str | None, given: dict[str, str],
               carry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The modal; `carry` rides along in private_metadata (dry_run, timeout, the command's response_url)."""
    blocks = [_input(TARGETS_BLOCK, "Targets", _text_element(targets), "Hosts, groups or ranges, e.g. web[01-03]", False)]
    for param in spec.params[:95]:  # a modal holds at most 100 blocks
        blocks.append(_input(block_id(param.name), param.name, _element(param, given.get(param.name)),
                             param.help, not param.required))
    metadata = json.dumps({"module": spec.name, "idc": idc, "channel": channel, **(carry or {})})
    return {
        "type": "modal", "callback_id": CALLBACK_ID, "private_metadata": metadata,
        "title": _plain(f"Run {spec.name}", 24), "submit": _plain("Run"), "close": _plain("Cancel"),
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"*{spec.name}* \u2014 {spec.description}"[:3000]}},
                   *blocks],
    }


def _input(bid: str, label: str, element: dict[str, Any], hint: str, optional: bool) -> dict[str, Any]:
    block = {"type": "input", "block_id": bid, "label": _plain(label, 2000), "element": element, "optional": optional}
    if hint:
        block["hint"] = _plain(hint, 2000)
    return block


def _text_element(initial: str | None, multiline: bool = False) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": VALUE_ACTION, "multiline": multiline}
    if initial:
        element["initial_value"] = initial
    return element


def _element(param: Param, given: str | None) -> dict[str, Any]:
    initial = given if given is not None else (None if param.default is None else param.default)
    kind = param.kind
    choices: tuple[str, ...] = getattr(param, "choices", ())
    if kind == "int":
        element = {"type": "number_input", "action_id": VALUE_ACTION, "is_decimal_allowed": False}
        for bound in ("min", "max"):
            if getattr(param, bound) is not None:
                element[f"{bound}_value"] = str(getattr(param, bound))
        if initial is not None:
            element["initial_value"] = str(initial)
        return element
    if kind == "bool":
        return _choose(("yes", "no"), "radio_buttons", None if initial is None else ("yes" if initial in (True, "yes", "true") else "no"))
    if kind == "radio" and len(choices) <= RADIO_MAX:
        return _choose(choices, "radio_buttons", initial)
    if kind in ("radio", "choice") and len(choices) <= SELECT_MAX:
        return _choose(choices, "static_select", initial)
    if kind == "multi" and len(choices) <= CHECKBOX_MAX:
        return _choose(choices, "checkboxes", initial, multi=True)
    if kind == "multi" and len(choices) <= SELECT_MAX:
        return _choose(choices, "multi_static_select", initial, multi=True)
    return _text_element(None if initial is None else str(initial), multiline=kind in ("script", "shell"))


def _choose(choices: tuple[str, ...], widget: str, initial: Any, multi: bool = False) -> dict[str, Any]:
    element: dict[str, Any] = {"type": widget, "action_id": VALUE_ACTION, "options": [_option(c) for c in choices]}
    if widget.endswith("select"):
        element["placeholder"] = _plain("Choose")
    if multi and initial:
        chosen = initial if isinstance(initial, list) else str(initial).split(",")
        element["initial_options"] = [_option(c) for c in chosen if c in choices]
    elif not multi and initial in choices:
        element["initial_option"] = _option(initial)
    return element


def read_submission(state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(targets, raw param values) from view.state.values; empty fields are left out."""
    values: dict[str, Any] = {}
    targets = ""
    for bid, actions in state.items():
        raw = _widget_value(actions.get(VALUE_ACTION) or {})
        if bid == TARGETS_BLOCK:
            targets = str(raw or "")
        elif bid.startswith("p:") and raw not in (None, "", []):
            values[bid[2:]] = raw
    return targets, values


def _widget_value(action: dict[str, Any]) -> Any:
    kind = action.get("type")
    if kind in ("static_select", "radio_buttons"):
        return (action.get("selected_option") or {}).get("value")
    if kind in ("checkboxes", "multi_static_select"):
        return [o["value"] for o in action.get("selected_options") or []]
    return action.get("value")


def validate_submission(spec: ModuleSpec, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate field by field so every problem shows next to its own field."""
    errors: dict[str, str] = {}
    for key in values:
        if spec.param(key) is None:
            errors[block_id(key)] = "not a parameter of this module"
    for param in spec.params:
        if param.name in values:
            try:
                param.convert(values[param.name])
            except ParamError as exc:
                errors[block_id(param.name)] = exc.expected[:150]
        elif param.required:
            errors[block_id(param.name)] = "required"
    return values, errors
