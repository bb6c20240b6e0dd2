"""How the unseen ``sms_spam`` evaluation templates were chosen, on calibration messages only (issue 29).

A candidate template is kept when the base model is above chance with it: each candidate scores
40 calibration messages (20 per label, seed 99) that are no candidate's and no evaluation
template's shot. No evaluation message is ever read. Candidates vary the instruction, example text,
label words, shot count, seed and order, with and without the reference query.

Run: ``python -m benchmarks.studies.template_choice [--model smollm2-135m] --data-dir DIR``.
"""

from __future__ import annotations

import argparse
import copy
import random

from calibrate.models import load_model
from calibrate.tasks import Labelled, evaluate_task, load_task
from calibrate.templates import SMS_EVALUATION, PromptTemplate

WORDS = {"hs": {"ham": " ham", "spam": " spam"}, "yn": {"ham": " no", "spam": " yes"},
         "jn": {"ham": " normal", "spam": " junk"}}
YES_NO = "Is each text message below spam? Answer yes or no."
JUNK = "Sort each phone message into junk or normal."
ANSWER = "Label each message as ham (a normal message) or spam."
INBOX = "Mobile phone messages, each marked as spam or as a normal message (ham)."


def candidates() -> list[PromptTemplate]:
    """Every candidate tried, each with the reference 'N/A' and with the plain choice."""
    out = []
    for ref in ("N/A", None):
        out += [PromptTemplate(f"yn-shuf-{ref}", YES_NO, "Text message: {text}\nIs it spam?", WORDS["yn"], 4, 101,
                               "shuffled", ref),
                PromptTemplate(f"yn-grp-{ref}", YES_NO, "Text message: {text}\nIs it spam?", WORDS["yn"], 4, 101,
                               "grouped", ref),
                PromptTemplate(f"yn8-{ref}", YES_NO, "Text message: {text}\nIs it spam?", WORDS["yn"], 8, 101,
                               "shuffled", ref),
                PromptTemplate(f"yn-ans-{ref}", "For each SMS, answer whether it is spam (yes or no).",
                               "SMS: {text}\nSpam? Answer:", WORDS["yn"], 6, 111, "shuffled", ref),
                PromptTemplate(f"junk6-{ref}", JUNK, 'SMS: "{text}"\nCategory:', WORDS["jn"], 6, 202,
                               "grouped-reversed", ref),
                PromptTemplate(f"junk6s-{ref}", JUNK, 'SMS: "{text}"\nCategory:', WORDS["jn"], 6, 202, "shuffled", ref),
                PromptTemplate(f"answer2-{ref}", ANSWER, "Message: {text}\nAnswer:", WORDS["hs"], 2, 303, "shuffled",
                               ref),
                PromptTemplate(f"answer8-{ref}", ANSWER, "Message: {text}\nAnswer:", WORDS["hs"], 8, 303, "shuffled",
                               ref),
                PromptTemplate(f"inbox4-{ref}", INBOX, "{text}\n=> this message is", WORDS["hs"], 4, 404, "shuffled",
                               ref),
                PromptTemplate(f"inbox6g-{ref}", INBOX, "{text}\n=> this message is", WORDS["hs"], 6, 405, "grouped",
                               ref),
                PromptTemplate(f"inbox8-{ref}", INBOX, "{text}\n=> this message is", WORDS["hs"], 8, 404, "shuffled",
                               ref)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    task = load_task("sms_spam", data_dir=args.data_dir)
    tried = candidates()
    shots = set()
    for template in tried + list(SMS_EVALUATION):
        shots |= set(template.shot_indices(task.calibration.labels, task.labels))
    rng = random.Random(99)
    pool = {k: [i for i, label in enumerate(task.calibration.labels) if label == k and i not in shots]
            for k in task.labels}
    pick = sorted(i for k in task.labels for i in rng.sample(pool[k], 20))
    tune = copy.copy(task)
    tune.evaluation = Labelled([task.calibration.texts[i] for i in pick], [task.calibration.labels[i] for i in pick])
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    print("| candidate | balanced accuracy | AUC | recall ham / spam |\n| --- | ---: | ---: | ---: |")
    for template in tried:
        r = evaluate_task(model, tokenizer, tune, template=template)
        print(f"| {template.name} | {r.balanced_accuracy:.3f} | {r.auc:.3f} | {r.recall['ham']:.2f} / "
              f"{r.recall['spam']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
