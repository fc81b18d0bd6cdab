"""What the gateway itself says, per language code; the questionnaire says the rest.

Twi (tw) strings are a DRAFT to be reviewed by a native speaker before fielding.
"""

from __future__ import annotations

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "language": "Language / Kasa:",
        "invalid_choice": "Invalid choice.",
        "required": "An answer is needed.",
        "invalid_integer": "Enter a whole number.",
        "invalid_decimal": "Enter a number.",
        "invalid_multi": "Enter option numbers separated by spaces.",
        "invalid_constraint": "That answer is not allowed.",
        "invalid_choice_range": "Please reply with a number from 1 to {n}.",
        "too_many_invalid": "Too many invalid entries. {again} again to continue.",
        "again_ussd": "Dial {target}",
        "again_sms": "Text {target}",
        "declined": "Thank you. Nothing has been recorded. Goodbye.",
        "quota_full": "Thank you! We already have enough answers from people like you. "
                      "{results} Goodbye.",
        "completed": "Thank you! Your answers are recorded.",
        "results_keyword": "RESULTS",
        "results_hint_sms": "Text {keyword} to see what people said.",
        "results_hint_dial": "Dial {target} later to see what people said.",
        "parts_note": "About {parts} short parts.",
        "skip": "Skip",
        "skip_inline": "{skip} skips",
        "skip_empty": "(Optional: send an empty reply to skip.)",
        "already_done": "You have already completed this survey. Thank you!",
        "part_done": "Part {part} of {parts} done. {again} to continue.",
        "resume": "Welcome back.",
        "continue": "Continue",
        "start_again": "Start again",
        "more": "More",
        "back": "Back",
        "ok": "OK",
        "closed": "This survey is not open. Thank you.",
        "rate_limited": "Too many requests from your number. Please try again in a few "
                        "minutes.",
        "stopped": "You will get no more messages from this survey service. "
                   "Text START to take part again.",
        "help": "Ghana Statistical Service survey on public services (SDG 16.6.2). Free, "
                "voluntary, no names. Text {keyword} to answer, LANG to change language, "
                "STOP to opt out, DELETE to erase your answers.",
        "erase_confirm": "Erase all your answers to every survey, your number and your "
                         "results request? Results already published are not changed. "
                         "Reply YES to erase.",
        "erase_confirm_ussd": "Erase all your answers, your number and results request? "
                              "Published results are not changed.",
        "erase_yes": "Yes, erase",
        "erase_no": "No",
        "erased": "Your answers, number and results request are erased. Results already "
                  "published are not changed. Thank you.",
        "erase_kept": "Nothing was erased.",
        "done_menu_results": "See the results",
        "done_menu_erase": "Delete my answers",
        "handover": "Your survey call was cut. You can finish here by SMS (free): reply to "
                    "this message.",
        "invitation": "Ghana Statistical Service asks about your experience of public services "
                      "(SDG 16.6.2). Free, no names. Reply {keyword} to take part, STOP to opt "
                      "out.",
        "results_none": "The results are not published yet. Thank you for waiting.",
        "results_too_few": "Results are published, but too few have answered yet to show "
                           "figures for your region or the nation.",
        "results_region_too_few": "Not enough answers yet for your region.",
        "reminder": "You have an unfinished survey on public services. Reply to continue "
                    "(free), or STOP to opt out.",
        "reminder_ussd": "You have an unfinished survey on public services. Dial {dial} to "
                         "continue where you left off (free). Reply STOP to opt out.",
        "intro": "Hello! Ghana Statistical Service asks about your experience of public "
                 "services. Text {keyword} to take part (free). HELP for info, STOP to opt out.",
    },
    "tw": {
        "language": "Language / Kasa:",
        "invalid_choice": "Wo mmuae no nye.",
        "required": "Yehia mmuae.",
        "invalid_integer": "Kyerew nsenkyerene mu.",
        "invalid_decimal": "Kyerew nsenkyerene.",
        "invalid_multi": "Kyerew nsenkyerene a ntam kwan wom.",
        "invalid_constraint": "Mmuae no ntumi nkɔ.",
        "invalid_choice_range": "Yɛsrɛ wo, fa nɔma a efi 1 kosi {n} bua.",
        "too_many_invalid": "Mfomso no adɔɔso. {again} bio na toa so.",
        "again_ussd": "Frɛ {target}",
        "again_sms": "Kyerɛw {target}",
        "declined": "Meda wo ase. Yɛnkyerɛw hwee. Nante yie.",
        "quota_full": "Meda wo ase! Yɛanya nkurɔfo a wɔte sɛ wo mmuae dodow. {results} "
                      "Nante yie.",
        "completed": "Meda wo ase! Yɛakyerɛw wo mmuae.",
        "results_keyword": "NEA ABA",
        "results_hint_sms": "Kyerɛw {keyword} hwɛ nea nkurɔfo kae.",
        "results_hint_dial": "Akyiri yi frɛ {target} hwɛ nea nkurɔfo kae.",
        "parts_note": "Ɛbɛyɛ ɔfa tiawa {parts}.",
        "skip": "Twa mu",
        "skip_inline": "{skip} twa mu",
        "skip_empty": "(Sɛ wopɛ a: mmua hwee na twa mu.)",
        "already_done": "Woawie nsɛmmisa yi dada. Meda wo ase!",
        "part_done": "Ɔfa {part} wɔ {parts} mu awie. {again} toa so.",
        "resume": "Akwaaba bio.",
        "continue": "Toa so",
        "start_again": "Fi ase bio",
        "more": "Nea aka",
        "back": "San w'akyi",
        "ok": "Yoo",
        "closed": "Nsɛmmisa yi nnim mu. Meda wo ase.",
        "rate_limited": "Wo nɔma no abisa pii dodo. Yɛsrɛ wo, san bɛka bio simma kakra akyi.",
        "stopped": "Wonnya nkrasɛm biara bio. Kyerɛw START na fa wo ho hyɛ mu bio.",
        "help": "Ghana Statistical Service nsɛmmisa fa aban nnwuma ho (SDG 16.6.2). Ɛyɛ kwa. "
                "Kyerɛw {keyword} bua, KASA sesa kasa, GYAE gyae, PEPA pepa wo mmuae.",
        "erase_confirm": "Yɛmpepa wo mmuae nyinaa, wo nɔma ne nea wopɛ sɛ yɛde mena wo? "
                         "Nea yɛatintim dada no rensesa. Kyerɛw AANE na yɛapepa.",
        "erase_confirm_ussd": "Yɛmpepa wo mmuae nyinaa ne wo nɔma? Nea yɛatintim dada no "
                              "rensesa.",
        "erase_yes": "Aane, pepa",
        "erase_no": "Daabi",
        "erased": "Yɛapepa wo mmuae, wo nɔma ne nea wopɛ sɛ yɛde mena wo. Nea yɛatintim "
                  "dada no rensesa. Meda wo ase.",
        "erase_kept": "Yɛmpepaa hwee.",
        "done_menu_results": "Hwɛ nea aba",
        "done_menu_erase": "Pepa me mmuae",
        "handover": "Wo frɛ no twae. Wobɛtumi awie ha wɔ SMS so (kwa): bua nkrasɛm yi.",
        "invitation": "Ghana Statistical Service pɛ sɛ wote wo nsusuwii fa aban nnwuma ho. "
                      "Ɛyɛ kwa. Kyerɛw {keyword} fa wo ho hyɛ mu, GYAE gyae.",
        "results_none": "Yɛntintimii nea yɛahunu no ɛ. Meda wo ase sɛ wotwɛn.",
        "results_too_few": "Yɛatintim nea yɛahunu, nanso mmuae no nnɔɔso mma wo mantam "
                           "anaa ɔman no ɛ.",
        "results_region_too_few": "Mmuae a efi wo mantam mu nnɔɔso ɛ.",
        "reminder": "Wonnwiee nsɛmmisa no. Bua na toa so (kwa), anaa GYAE.",
        "reminder_ussd": "Wonnwiee nsɛmmisa no. Frɛ {dial} na toa so (kwa). Kyerɛw GYAE gyae.",
        "intro": "Akwaaba! Ghana Statistical Service pɛ sɛ wote wo nsusuwii. Kyerɛw {keyword} "
                 "fi ase. MMOA ma nkyerɛkyerɛmu, GYAE gyae.",
    },
}


# SMS keywords, valid at any point, in every shipped language (Twi words are a draft).
KEYWORDS: dict[str, frozenset[str]] = {
    "stop": frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "QUIT", "GYAE"}),
    "help": frozenset({"HELP", "INFO", "MMOA", "BOA"}),
    "lang": frozenset({"LANG", "LANGUAGE", "KASA"}),
    "start": frozenset({"START", "SURVEY", "FI ASE", "HYE ASE"}),
    "results": frozenset({"RESULTS", "RESULT", "NEA ABA"}),
    # Erase my answers (Copenhagen Framework): asks to confirm first.
    "delete": frozenset({"DELETE", "ERASE", "REMOVE", "WITHDRAW", "PEPA"}),
}
# What confirms an erasure, in every language.
CONFIRM_WORDS = frozenset({"YES", "Y", "AANE"})


def message(code: str, key: str, **values: object) -> str:
    table = MESSAGES.get(code) or MESSAGES["en"]
    text = table.get(key) or MESSAGES["en"][key]
    return text.format(**values) if values else text
