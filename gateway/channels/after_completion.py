"""What a USSD dial shows someone who has completed the survey: a menu with the published
results and erasing their answers (after a confirmation). Shared by every USSD provider:
the provider module turns the reply into its own CON/END (or Hubtel's Response/Release)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.channels.sms import erased_event
from gateway.interview import render
from gateway.interview.engine import SessionState
from gateway.interview.messages import message
from gateway.store.registry import ChannelInfo


@dataclass(frozen=True)
class MenuStep:
    text: str  # the screen, without the provider's CON/END prefix
    end: bool
    erase: bool = False  # the respondent confirmed: erase them everywhere
    event: dict[str, Any] | None = None  # the `erased` stream entry


def done_menu(services: Any, ch: ChannelInfo, state: SessionState, respondent: str,
              inputs: list[str], session_key: str) -> MenuStep:
    """One hop of the menu: `inputs` are this session's entries so far ([] on the dial)."""
    code = services.registry.questionnaire(state.version).language(state.lang).code
    limit = ch.rules.body_limit

    def screen(text: str) -> str:
        return render.clip(render.fold(text), limit)

    if not inputs:
        body = (message(code, "already_done") + f"\n1 {message(code, 'done_menu_results')}"
                f"\n2 {message(code, 'done_menu_erase')}")
        return MenuStep(screen(body), end=False)
    if inputs[0] == "1":
        summary = services.store.results(ch.campaign_id, code,
                                         state.answer_map().get("region"))
        return MenuStep(screen(summary or message(code, "results_none")), end=True)
    if inputs[0] == "2":
        return _erase(code, screen, inputs[1:], respondent, session_key, ch)
    return MenuStep(screen(message(code, "already_done")), end=True)


RESUME_ERASE = "3"  # the option the resume screen adds on USSD (Rules.erase_on_resume)


def resume_menu(services: Any, ch: ChannelInfo, state: SessionState, respondent: str,
                inputs: list[str], session_key: str) -> MenuStep:
    """Erasing from the resume screen of an unfinished interview: `inputs` start with
    RESUME_ERASE (the other options go to the engine)."""
    code = services.registry.questionnaire(state.version).language(state.lang).code
    limit = ch.rules.body_limit
    return _erase(code, lambda text: render.clip(render.fold(text), limit), inputs[1:],
                  respondent, session_key, ch)


def _erase(code: str, screen: Any, inputs: list[str], respondent: str, session_key: str,
           ch: ChannelInfo) -> MenuStep:
    """Confirm, then erase: [] asks, ["1"] erases, anything else keeps everything."""
    if not inputs:
        body = (message(code, "erase_confirm_ussd") + f"\n1 {message(code, 'erase_yes')}"
                f"\n2 {message(code, 'erase_no')}")
        return MenuStep(screen(body), end=False)
    if inputs[0] == "1":
        return MenuStep(screen(message(code, "erased")), end=True, erase=True,
                        event=erased_event(respondent, session_key, ch.id))
    return MenuStep(screen(message(code, "erase_kept")), end=True)
