"""Writes examples/demo/{train,eval}.jsonl: short questions with checkable answers for the CPU
demo (capitals, everyday facts, small arithmetic). Written for kdrl; deterministic.

Run from the repository root: .venv/bin/python scripts/make_demo_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "the United Kingdom": "London",
    "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Turkey": "Ankara",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Cuba": "Havana", "Hungary": "Budapest", "the Czech Republic": "Prague", "Iran": "Tehran",
    "Mexico": "Mexico City", "India": "New Delhi|Delhi", "Brazil": "Brasilia|Brasília",
}  # fmt: skip

FACTS = [
    ("How many days are in a week?", "7|seven"),
    ("How many legs does a spider have?", "8|eight"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("What gas do plants absorb from the air?", "carbon dioxide|CO2"),
    ("At what temperature in Celsius does water boil?", "100"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("How many continents are there on Earth?", "7|seven"),
    ("What is the chemical symbol for gold?", "Au"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("How many hours are in a day?", "24|twenty-four"),
    ("What is the opposite of hot?", "cold"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("How many sides does a triangle have?", "3|three"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What do bees make?", "honey"),
    ("How many minutes are in an hour?", "60|sixty"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("What is frozen water called?", "ice"),
    ("How many months are in a year?", "12|twelve"),
    ("What language is spoken in Spain?", "Spanish"),
    ("Who painted the Mona Lisa?", "Leonardo|da Vinci"),
    ("What is the largest mammal?", "blue whale|whale"),
    ("What is the main ingredient in guacamole?", "avocado"),
    ("Which star is closest to the Earth?", "Sun"),
    ("What is the color of the sky on a clear day?", "blue"),
    ("How many wheels does a bicycle have?", "2|two"),
    ("What do caterpillars turn into?", "butterfly|butterflies|moth"),
    ("What is the hardest natural substance?", "diamond"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is the freezing point of water in Celsius?", "0|zero"),
    ("How many legs does an insect have?", "6|six"),
    ("Which season comes after winter?", "spring"),
    ("What do you call a baby dog?", "puppy"),
    ("What is the currency of Japan?", "yen"),
]


def rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    capitals = [
        {"prompt": f"What is the capital of {country}?", "answer": city}
        for country, city in CAPITALS.items()
    ]
    facts = [{"prompt": q, "answer": a} for q, a in FACTS]
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20) if a <= b]
    rng.shuffle(pairs)
    sums = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs[:40]]
    for group in (capitals, facts, sums):
        rng.shuffle(group)
    held_out = capitals[:10] + facts[:10] + sums[:10]
    train = capitals[10:] + facts[10:] + sums[10:]
    rng.shuffle(train)
    return train, held_out


def main() -> None:
    out = Path("examples/demo")
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = rows()
    for name, data in (("train", train), ("eval", held_out)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{out / name}.jsonl: {len(data)} prompts")


if __name__ == "__main__":
    main()
