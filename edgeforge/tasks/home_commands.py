"""``home-commands``: spoken-style home-automation commands -> JSON intents, checked by exact match.

"dim the bedroom lights to 30% at 10pm" -> {"device": "light", "room": "bedroom", "action": "dim", "value": 30,
"time": "22:00"}. The user message is the command itself and the answer is the JSON alone, so the shipped model
works as an intent parser with no special prompt. Generated with a fixed seed. Held-out examples use phrasings
(templates) and slot values (numbers, times, some rooms) that never occur in training.
"""

from __future__ import annotations

import json
import random
from typing import Any

ROOMS_TRAIN = ["bedroom", "kitchen", "living room", "bathroom", "office", "garage", "hallway", "dining room"]
ROOMS_HELDOUT_ONLY = ["guest room", "basement"]

# (device, action, value kind) -> training templates, held-out templates. {room} {value} {time} are slots;
# a template without {time} gets no time. Values: percent, temperature or level.
INTENTS: list[dict[str, Any]] = [
    {"device": "light", "action": "turn_on", "value": None,
     "train": ["turn on the {room} lights", "switch on the light in the {room}", "lights on in the {room}",
               "please turn the {room} light on"],
     "heldout": ["can you put the {room} lights on", "I need light in the {room}"]},
    {"device": "light", "action": "turn_off", "value": None,
     "train": ["turn off the {room} lights", "switch off the light in the {room}", "lights off in the {room}",
               "kill the {room} lights"],
     "heldout": ["shut the {room} lights off", "no more light in the {room} please"]},
    {"device": "light", "action": "dim", "value": "percent",
     "train": ["dim the {room} lights to {value}%", "set the {room} light to {value} percent",
               "make the {room} lights {value}%"],
     "heldout": ["lower the {room} lighting to {value}%", "{room} lights at {value} percent please"]},
    {"device": "thermostat", "action": "set", "value": "temperature",
     "train": ["set the {room} thermostat to {value} degrees", "make it {value} degrees in the {room}",
               "heat the {room} to {value} degrees"],
     "heldout": ["I want the {room} at {value} degrees", "change the {room} temperature to {value}"]},
    {"device": "blinds", "action": "open", "value": None,
     "train": ["open the {room} blinds", "raise the blinds in the {room}"],
     "heldout": ["let some sun into the {room}"]},
    {"device": "blinds", "action": "close", "value": None,
     "train": ["close the {room} blinds", "lower the blinds in the {room}"],
     "heldout": ["shut the {room} blinds"]},
    {"device": "fan", "action": "set", "value": "level",
     "train": ["set the {room} fan to speed {value}", "fan in the {room} on level {value}"],
     "heldout": ["run the {room} fan at {value}"]},
    {"device": "fan", "action": "turn_off", "value": None,
     "train": ["turn off the {room} fan", "stop the fan in the {room}"],
     "heldout": ["the {room} fan can go off now"]},
]
TIME_SUFFIX_TRAIN = [" at {time}", " at {time} please", " tonight at {time}"]
TIME_SUFFIX_HELDOUT = [" when it is {time}", " around {time}"]


def _values(kind: str | None, heldout: bool) -> list[int]:
    # Held-out numbers never occur in training: training uses even tens / even degrees, held-out the others.
    if kind == "percent":
        return list(range(15, 100, 10)) if heldout else list(range(10, 101, 10))
    if kind == "temperature":
        return list(range(17, 28, 2)) if heldout else list(range(16, 29, 2))
    if kind == "level":
        return [3] if heldout else [1, 2, 4, 5]
    return [0]


def _times(heldout: bool) -> list[tuple[str, str]]:
    """(spoken, HH:MM) pairs; held-out times are on the half hour, which training never uses."""
    out = []
    for h in range(24):
        for m in (30,) if heldout else (0, 15, 45):
            h12 = h % 12 or 12
            spoken = f"{h12}{'' if m == 0 else f':{m:02d}'}{'am' if h < 12 else 'pm'}"
            out.append((spoken, f"{h:02d}:{m:02d}"))
    return out


def intent_json(intent: dict[str, Any], room: str, value: int | None, time: str | None) -> str:
    """The canonical answer: keys in a fixed order, absent slots omitted, no spaces beyond JSON's defaults."""
    d: dict[str, Any] = {"device": intent["device"], "room": room, "action": intent["action"]}
    if value is not None:
        d["value"] = value
    if time is not None:
        d["time"] = time
    return json.dumps(d)


def _example(rng: random.Random, heldout: bool) -> dict[str, Any]:
    intent = rng.choice(INTENTS)
    template = rng.choice(intent["heldout" if heldout else "train"])
    rooms = ROOMS_TRAIN + (ROOMS_HELDOUT_ONLY if heldout else [])
    room = rng.choice(rooms)
    value = rng.choice(_values(intent["value"], heldout)) if intent["value"] else None
    text = template.format(room=room, value=value)
    time = None
    if rng.random() < 0.35:
        spoken, time = rng.choice(_times(heldout))
        text += rng.choice(TIME_SUFFIX_HELDOUT if heldout else TIME_SUFFIX_TRAIN).format(time=spoken)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return {"messages": [{"role": "user", "content": text},
                         {"role": "assistant", "content": intent_json(intent, room, value, time)}]}


def build(seed: int = 0, n_train: int = 3000, n_heldout: int = 300) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples, deterministic for ``seed``."""
    rng = random.Random(seed)
    train = [_example(rng, heldout=False) for _ in range(n_train)]
    heldout = [_example(rng, heldout=True) for _ in range(n_heldout)]
    return train, heldout


def _register() -> None:
    from edgeforge.tasks import register_task

    register_task("home-commands", build)


_register()
