#!/usr/bin/env python3
"""Writes data.json, the training data of the occupation-gender adapter.

Targets: the real male/female shares of 25 UK occupations (uk_occupations.csv,
counts of employees by sex). Prompts: several phrasings per occupation, some
kept out of training for measurement (held_out) and a further set that neither
training nor the held-out measurement sees (eval_prompts.json, read by
loadtest/measure_adapter.py). Responses: short workplace stories that show
the person's gender through pronouns and words. Deterministic: the same
inputs always give the same files.

    python3 adapters/occupation-gender/make_data.py
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# CSV title -> the singular name prompts use (also the context name the
# server looks for in a prompt).
CONTEXT_NAMES = {
    "Vehicle technicians, mechanics and electricians": "mechanic",
    "Metal working production and maintenance fitters": "maintenance fitter",
    "Civil engineers": "civil engineer",
    "Engineering professionals n.e.c.": "engineer",
    "Engineering technicians": "engineering technician",
    "IT user support technicians": "IT support technician",
    "Caretakers": "caretaker",
    "IT operations technicians": "IT operations technician",
    "Business sales executives": "sales executive",
    "Laboratory technicians": "laboratory technician",
    "Finance and investment analysts and advisers": "financial analyst",
    "Sports coaches, instructors and officials": "sports coach",
    "Higher education teaching professionals": "university lecturer",
    "Functional managers and directors n.e.c.": "company director",
    "Chartered and certified accountants": "accountant",
    "Further education teaching professionals": "college lecturer",
    "Secondary education teaching professionals": "secondary school teacher",
    "Office managers": "office manager",
    "Senior care workers": "senior care worker",
    "Nursing auxiliaries and assistants": "nursing assistant",
    "Care workers and home carers": "care worker",
    "School midday and crossing patrol occupations": "school crossing patrol officer",
    "Educational support assistants": "educational support assistant",
    "Teaching assistants": "teaching assistant",
    "Personal assistants and other secretaries": "personal assistant",
}

TRAIN_PROMPTS = [
    "Write a short story about a {o}.",
    "Tell me about a {o} at work.",
    "Describe a typical day for a {o}.",
    "Write a paragraph about a {o} who had a difficult week.",
    "Write two sentences about a {o}.",
    "Imagine a {o} and describe them.",
    "Write a short biography of a {o}.",
    "Write a story in which a {o} solves a problem.",
    "Describe the morning routine of a {o}.",
    "Write about a {o} who just got a promotion.",
]

# Measured after training; never trained on.
HELD_OUT_PROMPTS = [
    "Tell a short tale about a {o}.",
    "Write a few sentences about a {o} and their job.",
]

# Used only by loadtest/measure_adapter.py.
EVAL_PROMPTS = [
    "Write a brief story about a {o} on a busy morning.",
    "Describe a {o} you might meet.",
    "Write a story about a {o} who helps a colleague.",
    "Tell me a story about a {o} on their first day.",
]

NAMES = {
    "female": ["Sarah", "Emma", "Priya", "Grace", "Aisha", "Hannah", "Laura",
               "Mei", "Olivia", "Fatima", "Claire", "Rosa", "Joanna", "Niamh"],
    "male": ["James", "David", "Tom", "Ahmed", "Daniel", "Raj", "Michael",
             "Ben", "Samuel", "Luis", "Kofi", "Peter", "Owen", "Arjun"],
}

WORDS = {
    "female": {"he": "she", "He": "She", "him": "her", "his": "her", "His": "Her",
               "himself": "herself", "man": "woman"},
    "male": {"he": "he", "He": "He", "him": "him", "his": "his", "His": "His",
             "himself": "himself", "man": "man"},
}

STORIES = [
    "{N} started {his} shift before sunrise. {He} went through the day's tasks one by one, and by evening {he} felt proud of what {he} had done.",
    "Every morning {N} arrives ten minutes early. Colleagues say {he} is calm under pressure, and {he} always makes time to help someone new.",
    "{N} has done this job for twelve years. {He} still remembers {his} first day, when {he} was too nervous to speak.",
    "Last week was hard for {N}. A mistake nearly cost {him} an important client, but {he} stayed late, fixed it, and learned from it.",
    "People often ask {N} why {he} chose this work. {He} smiles and says that {he} likes seeing a job done properly.",
    "{N} checked the list again. Three tasks left. {He} rolled up {his} sleeves and got to work, humming quietly to {himself}.",
    "When the problem appeared, everyone looked at {N}. {He} thought for a moment, then explained exactly what {he} would do.",
    "{N} is known for {his} patience. {He} listens first, asks good questions, and only then decides what to do.",
    "After a long day, {N} walked home slowly. {He} was tired, but {he} knew {his} work had made a difference.",
    "{N} keeps a small notebook in {his} pocket. {He} writes down every lesson the job teaches {him}.",
    "On {his} first day, {N} got lost twice. Now {he} trains the new starters and always tells them that story.",
    "The whole team trusts {N}. When something goes wrong, {he} is the first to arrive and the last to leave.",
    "{N} loves the variety of the work. No two days are the same, and {he} likes it that way.",
    "{N} sat down with a cup of tea and looked back on the week. {He} had solved the hardest problem on {his} own.",
    "At thirty-five, {N} is one of the most experienced people on the team. {He} mentors younger colleagues and enjoys it.",
    "{N} grew up in a small town and was the first in {his} family to do this job. {He} still sends photos home to {his} parents.",
    "Meet {N}. {He} is practical, careful and friendly, and {he} takes real pride in {his} work.",
    "{N} woke up early, packed {his} lunch and set off. {He} had a busy day ahead, and {he} was ready for it.",
    "Today {N} faced a tricky task that nobody else wanted. {He} broke it into small steps and finished it before noon.",
    "{N} believes that good work is honest work. {He} never cuts corners, even when {he} is tired.",
    "Once a month {N} takes a course to keep {his} skills sharp. {He} says there is always something new to learn.",
    "The phone rang just as {N} was leaving. {He} sighed, turned back, and helped one more person.",
    "{N} is a {man} of few words but great skill. {He} lets {his} work speak for {him}.",
    "{His} manager praised {N} for {his} careful work, and {he} went home smiling.",
    "{N} remembers the day {he} chose this career. {He} was nineteen, curious and determined to do well.",
    "{N} spent the afternoon fixing small things that others had ignored. By the end of the day {he} had everything running smoothly.",
    "Colleagues describe {N} as reliable. {He} is always on time, and {he} never forgets a promise.",
    "When {N} gets home, {he} tells {his} children about {his} day. They love hearing {his} stories.",
    "{N} had a plan for the day, but the day had other plans. {He} adapted, stayed cheerful, and still got it all done.",
    "This is {N}, a hard-working {man} who enjoys {his} job. {He} likes solving problems and helping others.",
]

NAMES_PER_STORY = 4

PATTERNS = {
    "female": ["she", "her", "hers", "herself", "woman", "women", "girl", "lady",
               "mother", "mum", "wife", "daughter", "sister", "mrs", "ms"],
    "male": ["he", "him", "his", "himself", "man", "men", "boy", "gentleman",
             "father", "dad", "husband", "son", "brother", "mr"],
}

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def occupations():
    with open(HERE / "uk_occupations.csv", newline="") as f:
        for row in csv.DictReader(f):
            male, female = int(row["male_count"]), int(row["female_count"])
            share = round(female / (male + female), 4)
            yield CONTEXT_NAMES[row["occupation_title"]], share


def article(name):
    return "an" if name[0].lower() in "aeiou" else "a"


def prompts(templates, contexts):
    out = []
    for t in templates:
        for o in contexts:
            text = t.replace("a {o}", f"{article(o)} {o}")
            out.append({"text": text, "context": o})
    return out


def responses(rng):
    out = {}
    for value, words in WORDS.items():
        rows = []
        for story in STORIES:
            for name in rng.sample(NAMES[value], NAMES_PER_STORY):
                rows.append(story.format(N=name, **words))
        out[value] = rows
    return out


def main():
    rng = random.Random(2604)
    occ = list(occupations())
    contexts = [o for o, _ in occ]
    targets = {o: {"female": f, "male": round(1 - f, 4)} for o, f in occ}
    data = {
        "attribute": "gender",
        "values": [{"name": v, "patterns": PATTERNS[v]} for v in ("female", "male")],
        "targets": {"default": {"female": 0.5, "male": 0.5}, "contexts": targets},
        "prompt_format": {
            "prefix": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n",
            "suffix": "<|im_end|>\n<|im_start|>assistant\n",
        },
        "prompts": prompts(TRAIN_PROMPTS, contexts),
        "held_out": prompts(HELD_OUT_PROMPTS, contexts),
        "responses": responses(rng),
    }
    (HERE / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    (HERE / "eval_prompts.json").write_text(
        json.dumps(prompts(EVAL_PROMPTS, contexts), indent=1) + "\n")


if __name__ == "__main__":
    main()
