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
                      "Text RESULTS later to see what people said. Goodbye.",
        "completed": "Thank you! Your answers are recorded. Text RESULTS to see what people said.",
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
                "STOP to opt out.",
        "handover": "Your survey call was cut. You can finish here by SMS (free): reply to "
                    "this message.",
        "invitation": "Ghana Statistical Service asks about your experience of public services "
                      "(SDG 16.6.2). Free, no names. Reply {keyword} to take part, STOP to opt "
                      "out.",
        "results_none": "The results are not published yet. Thank you for waiting.",
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
        "quota_full": "Meda wo ase! Yɛanya nkurɔfo a wɔte sɛ wo mmuae dodow. Akyiri yi "
                      "kyerɛw RESULTS hwɛ nea nkurɔfo kae. Nante yie.",
        "completed": "Meda wo ase! Yɛakyerɛw wo mmuae. Kyerɛw RESULTS hwɛ nea nkurɔfo kae.",
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
                "Kyerɛw {keyword} bua, KASA sesa kasa, GYAE gyae.",
        "handover": "Wo frɛ no twae. Wobɛtumi awie ha wɔ SMS so (kwa): bua nkrasɛm yi.",
        "invitation": "Ghana Statistical Service pɛ sɛ wote wo nsusuwii fa aban nnwuma ho. "
                      "Ɛyɛ kwa. Kyerɛw {keyword} fa wo ho hyɛ mu, GYAE gyae.",
        "results_none": "Yɛntintimii nea yɛahunu no ɛ. Meda wo ase sɛ wotwɛn.",
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
}


def message(code: str, key: str, **values: object) -> str:
    table = MESSAGES.get(code) or MESSAGES["en"]
    text = table.get(key) or MESSAGES["en"][key]
    return text.format(**values) if values else text
