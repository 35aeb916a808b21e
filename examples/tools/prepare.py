"""Generate the tool-calling example's data: requests whose right call follows from their words.

Three functions (weather, currency conversion, a kitchen timer) are offered in every record, in
OpenAI's chat format (``tools``, assistant ``tool_calls`` with JSON-text arguments). Each user
request names everything the call needs, so there is one right call: the function and its
arguments, copied from the request. A quarter of the records first hold an earlier exchange (a
call, its ``tool`` result, the assistant's answer from it) before the new request, so the model
also reads tool results as training renders them. Test requests use cities, labels and amounts
from pools that training also draws from, plus cities training never sees. Seeded: the files are
reproducible.

    python examples/tools/prepare.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from": {"type": "string"},
            "to": {"type": "string"}}, "required": ["amount", "from", "to"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a timer",
        "parameters": {"type": "object", "properties": {
            "minutes": {"type": "integer"}, "label": {"type": "string"}},
            "required": ["minutes", "label"]}}},
]

CITIES = ["Paris", "Lyon", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Dublin",
          "Oslo", "Helsinki", "Athens", "Warsaw", "Budapest", "Zurich", "Brussels", "Amsterdam",
          "Copenhagen", "Stockholm", "Munich", "Milan", "Porto", "Seville", "Krakow", "Geneva",
          "Tokyo", "Osaka", "Seoul", "Toronto", "Chicago", "Boston", "Denver", "Sydney", "Lima"]
UNSEEN_CITIES = ["Nairobi", "Hanoi", "Quito", "Tbilisi", "Reykjavik", "Montevideo"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK", "NOK", "PLN"]
LABELS = ["pasta", "tea", "eggs", "laundry", "bread", "rice", "pizza", "nap", "workout",
          "meeting", "cookies", "soup", "coffee", "oven", "yoga"]

WEATHER = ["What's the weather in {city}?", "How is the weather in {city} right now?",
           "Is it raining in {city}?", "Tell me the current weather for {city}.",
           "Weather check: {city}, please."]
WEATHER_UNIT = ["What's the weather in {city} in {unit}?",
                "Give me the temperature in {city} in {unit}.",
                "How warm is it in {city}? Use {unit}."]
CURRENCY = ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}.",
            "What are {amount} {src} worth in {dst}?", "Change {amount} {src} into {dst}, please."]
TIMER = ["Set a {minutes} minute timer for the {label}.",
         "Start a timer for {minutes} minutes called {label}.",
         "Remind me about the {label} in {minutes} minutes.",
         "Timer: {label}, {minutes} minutes."]


def request(rng: random.Random, cities: list[str]) -> tuple[str, str, dict]:
    """A user request, the function it calls and the call's arguments."""
    kind = rng.randrange(3)
    if kind == 0:
        city = rng.choice(cities)
        if rng.random() < 0.4:
            unit = rng.choice(["celsius", "fahrenheit"])
            text = rng.choice(WEATHER_UNIT).format(city=city, unit=unit)
            return text, "get_weather", {"city": city, "unit": unit}
        return rng.choice(WEATHER).format(city=city), "get_weather", {"city": city}
    if kind == 1:
        amount = rng.choice([rng.randint(2, 999), rng.randint(1, 99) * 10])
        src, dst = rng.sample(CURRENCIES, 2)
        text = rng.choice(CURRENCY).format(amount=amount, src=src, dst=dst)
        return text, "convert_currency", {"amount": amount, "from": src, "to": dst}
    minutes, label = rng.randint(1, 90), rng.choice(LABELS)
    text = rng.choice(TIMER).format(minutes=minutes, label=label)
    return text, "set_timer", {"minutes": minutes, "label": label}


def call(number: int, name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{number}", "type": "function",
         "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def history(rng: random.Random, cities: list[str]) -> list[dict]:
    """An earlier weather exchange: the request, the call, its result and the answer."""
    city = rng.choice(cities)
    degrees = rng.randint(-5, 32)
    sky = rng.choice(["sunny", "cloudy", "rainy", "windy"])
    return [{"role": "user", "content": rng.choice(WEATHER).format(city=city)},
            call(0, "get_weather", {"city": city}),
            {"role": "tool", "tool_call_id": "call_0",
             "content": json.dumps({"city": city, "celsius": degrees, "sky": sky})},
            {"role": "assistant", "content": f"It is {degrees}°C and {sky} in {city}."}]


def record(rng: random.Random, cities: list[str]) -> tuple[str, dict]:
    text, name, arguments = request(rng, cities)
    earlier = history(rng, cities) if rng.random() < 0.25 else []
    messages = [*earlier, {"role": "user", "content": text}, call(1, name, arguments)]
    return text, {"messages": messages, "tools": TOOLS}


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    splits = {"train": (200, CITIES), "valid": (24, CITIES), "test": (60, CITIES + UNSEEN_CITIES)}
    for split, (count, cities) in splits.items():
        rows = []
        while len(rows) < count:
            text, row = record(rng, cities)
            if text in seen:  # no request is in two splits (or twice in one)
                continue
            seen.add(text)
            rows.append(row)
        with open(HERE / f"{split}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


if __name__ == "__main__":
    main()
