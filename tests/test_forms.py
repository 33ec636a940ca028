"""Modals generated from module parameters stay within Slack's limits, and read back what people chose."""

from __future__ import annotations

import json

from ombot.bot import forms
from ombot.modules import ModuleSpec, Risk
from ombot.modules import params as p
from tests.fakeslack import view_problems


def spec(*params: p.Param) -> ModuleSpec:
    return ModuleSpec("demo.form", "A form for tests.", "test", Risk.LOW, tuple(params))


def element(view: dict, name: str) -> dict:
    return next(b for b in view["blocks"] if b.get("block_id") == forms.block_id(name))["element"]


def test_widgets_follow_the_kind_and_fall_back_within_slack_limits() -> None:
    few = tuple(f"c{i}" for i in range(5))
    many = tuple(f"c{i}" for i in range(40))
    huge = tuple(f"c{i}" for i in range(150))
    view = forms.build_view(spec(
        p.String("name"), p.Int("count", min=1, max=9), p.Bool("force", required=False, default=False),
        p.Radio("mode", choices=few), p.Radio("zone", choices=many), p.Choice("pick", choices=huge),
        p.MultiChoice("tags", choices=few), p.MultiChoice("many", choices=many), p.Script("script"),
    ), "bj", "C0OPS", "web[01-03]", {"name": "nginx"})
    assert not view_problems(view), view_problems(view)
    kinds = {name: element(view, name)["type"] for name in
             ("name", "count", "force", "mode", "zone", "pick", "tags", "many", "script")}
    assert kinds == {
        "name": "plain_text_input", "count": "number_input", "force": "radio_buttons", "mode": "radio_buttons",
        "zone": "static_select", "pick": "plain_text_input", "tags": "checkboxes",
        "many": "multi_static_select", "script": "plain_text_input",
    }
    assert element(view, "script")["multiline"] is True
    assert element(view, "name")["initial_value"] == "nginx"
    assert element(view, "count")["min_value"] == "1" and element(view, "count")["max_value"] == "9"
    targets = next(b for b in view["blocks"] if b.get("block_id") == forms.TARGETS_BLOCK)
    assert targets["element"]["initial_value"] == "web[01-03]"
    assert json.loads(view["private_metadata"]) == {"module": "demo.form", "idc": "bj", "channel": "C0OPS"}


def test_submissions_are_read_back_and_validated_field_by_field() -> None:
    form = spec(p.Int("count", min=1, max=9), p.MultiChoice("tags", choices=("a", "b")), p.Radio("mode", choices=("x", "y")))
    state = {
        forms.TARGETS_BLOCK: {"v": {"type": "plain_text_input", "value": "web01"}},
        "p:count": {"v": {"type": "number_input", "value": "12"}},
        "p:tags": {"v": {"type": "checkboxes", "selected_options": [{"value": "a"}, {"value": "b"}]}},
        "p:mode": {"v": {"type": "radio_buttons", "selected_option": None}},
    }
    targets, values = forms.read_submission(state)
    assert targets == "web01" and values == {"count": "12", "tags": ["a", "b"]}
    _, errors = forms.validate_submission(form, values)
    assert errors == {"p:count": "an integer from 1 to 9", "p:mode": "required"}
