"""A built-in synthetic preference corpus: safe vs risky advice.

In the spirit of the TI-DPO paper's medical case study, chosen and rejected answers share almost all
of their text and differ only in a short *critical span* ("see a doctor within the hour" vs "wait a
few days and see"). Knowing exactly where the preference signal lies lets tests and benchmarks check
whether token-importance weights find it. With `span_position="middle"` (the default, and the corpus
tidpo has always shipped) the span sits mostly in the middle of the answer, the region the paper's
Gaussian prior favours, with preamble and follow-up sentences of varying length around it so its relative
position still varies. `span_position="uniform"` puts 0 to 3 of the answer's other sentences before the
span's sentence and the rest after it, so the span is as likely near the start or the end as in the
middle, and the prior has no built-in advantage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

from tidpo_core.data.pairs import PreferencePair, make_pair_id

__all__ = [
    "SPAN_POSITIONS",
    "TOPICS",
    "SpanPosition",
    "Topic",
    "contains_phrase",
    "critical_phrases",
    "generate_synthetic_pairs",
    "normalize_text",
]

SpanPosition = Literal["middle", "uniform"]
SPAN_POSITIONS: tuple[str, ...] = get_args(SpanPosition)
# Sentences around the span's sentence when its position is uniform: 0..UNIFORM_OTHER_SENTENCES before it.
UNIFORM_OTHER_SENTENCES = 3

SOURCE = "synthetic"
# After this many duplicate draws in a row, a reference number is added to the question so that
# any n can be reached even if the templates' combinations run out.
MAX_DUPLICATE_DRAWS = 20
MAX_WORDS = 70


@dataclass(frozen=True)
class Topic:
    name: str
    questions: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]
    preambles: tuple[str, ...]
    # Each contains "{phrase}", completed by an infinitive verb phrase.
    cores: tuple[str, ...]
    # (safe, risky) verb phrases: the critical spans.
    phrases: tuple[tuple[str, str], ...]
    followups: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        name="medical",
        questions=(
            "My {rel} suddenly has {symptom}. What should we do?",
            "What should I do if my {rel} has {symptom}?",
            "My {rel} has had {symptom} since {time}. Should I worry?",
            "Is it serious that my {rel} started having {symptom} {time}?",
        ),
        slots={
            "rel": (
                "father",
                "mother",
                "grandmother",
                "grandfather",
                "partner",
                "roommate",
                "brother",
                "aunt",
            ),
            "symptom": (
                "chest pain spreading to the left arm",
                "a sudden severe headache and blurred vision",
                "slurred speech and a drooping face",
                "trouble breathing after a bee sting",
                "a high fever and a stiff neck",
                "sudden confusion and weakness on one side",
            ),
            "time": ("this morning", "an hour ago", "last night", "after lunch"),
        },
        preambles=(
            "Those symptoms can point to a serious problem even when they seem to ease off.",
            "I am not a doctor, but this combination of symptoms is a well known warning sign.",
            "It is understandable to feel unsure, and it is good that you are asking right now.",
            "Symptoms like these can change quickly, so the first minutes really matter.",
        ),
        cores=(
            "The safest step is to {phrase}.",
            "What I would recommend is to {phrase} and not delay.",
            "In a case like this you should {phrase}.",
        ),
        phrases=(
            ("call emergency services right now", "wait a few days and see"),
            ("see a doctor within the hour", "sleep on it and check tomorrow"),
            ("get to an emergency room immediately", "rest at home until it passes"),
            ("call an ambulance without delay", "take a painkiller and ignore it"),
        ),
        followups=(
            "While you wait, keep them calm and note when the symptoms started.",
            "Write down any medicines they take so the staff can see them quickly.",
            "Do not let them drive themselves anywhere in this state.",
            "If anything gets worse, tell the people helping you straight away.",
        ),
    ),
    Topic(
        name="medication_dosage",
        questions=(
            "How much {drug} can I take in one day?",
            "Can I take a double dose of {drug} if the pain is bad?",
            "Is it okay to give my {age}-year-old an adult dose of {drug}?",
            "I already took {drug} two hours ago. Can I take more now?",
        ),
        slots={
            "drug": ("ibuprofen", "acetaminophen", "aspirin", "naproxen", "cough syrup", "an antihistamine"),
            "age": tuple(str(a) for a in range(3, 13)),
        },
        preambles=(
            "Dosing limits exist because the gap between a helpful and a harmful amount can be small.",
            "Every medicine label lists a maximum daily amount for a good reason.",
            "It is very common to want faster relief when the pain is bad.",
        ),
        cores=(
            "The safe approach is to {phrase}.",
            "My advice is to {phrase}, even if it feels slow.",
            "With {drug}, you should {phrase}.",
        ),
        phrases=(
            ("follow the dose on the label exactly", "double the dose to make it work faster"),
            ("ask a pharmacist before taking more", "take extra whenever the pain returns"),
            ("stay under the daily maximum on the package", "ignore the daily limit just this once"),
            ("use the dose listed for their weight", "give them the full adult dose"),
        ),
        followups=(
            "Taking too much can damage the liver or stomach without obvious early signs.",
            "If the pain does not improve, a doctor can suggest a better option.",
            "Keep a note of the times you take each dose so you do not lose track.",
        ),
    ),
    Topic(
        name="electrical_safety",
        questions=(
            "The outlet in my {room} is sparking. Can I fix it myself?",
            "How do I replace a light switch in the {room}?",
            "My {appliance} got wet in the {room}. Can I plug it back in?",
            "A breaker for the {room} keeps tripping. What should I do?",
        ),
        slots={
            "room": ("kitchen", "bathroom", "garage", "bedroom", "basement", "living room", "attic"),
            "appliance": ("hair dryer", "toaster", "kettle", "space heater", "laptop charger", "lamp"),
        },
        preambles=(
            "Household wiring carries enough current to cause serious injury.",
            "Electrical faults are one of the most common causes of house fires.",
            "It is good that you noticed the problem before anyone got hurt.",
        ),
        cores=(
            "Before touching anything, you should {phrase}.",
            "The correct step is to {phrase}.",
            "Honestly, the best thing is to {phrase} and be patient.",
        ),
        phrases=(
            ("switch off the breaker and test the wires", "just work on it with the power on"),
            ("call a licensed electrician", "tape over the wires and keep using it"),
            ("let it dry fully and have it checked", "plug it straight back in to test it"),
            ("unplug it and stop using it", "keep using it until it stops working"),
        ),
        followups=(
            "Keep children and pets away from the area until it is sorted out.",
            "A small repair done safely is much cheaper than a fire.",
            "If you smell burning plastic, leave the room and call for help.",
        ),
    ),
    Topic(
        name="finance_scams",
        questions=(
            "Someone called saying they are from my bank and asked for my {secret}. Should I give it?",
            "I got an email saying I won {amount} dollars but must pay a fee first. Is it real?",
            "A stranger online offers to double my {amount} dollars in a week. Should I invest?",
            "My {rel} got a text asking them to buy gift cards for their boss. What should they do?",
        ),
        slots={
            "secret": ("PIN", "one-time code", "password", "card number", "security answer"),
            "amount": ("500", "1,000", "2,500", "5,000", "10,000", "25,000"),
            "rel": ("mother", "father", "cousin", "neighbour", "coworker", "grandfather"),
        },
        preambles=(
            "Scammers often create a sense of urgency so that people act before thinking.",
            "Real banks and companies do not ask for this kind of information out of the blue.",
            "Offers that sound too good to be true almost always are.",
        ),
        cores=(
            "The safe response is to {phrase}.",
            "What you should do is {phrase}.",
            "My recommendation is to {phrase} without exception.",
        ),
        phrases=(
            ("hang up and call the official number", "give them the details they asked for"),
            ("ignore the message and report it", "pay the fee to claim the prize"),
            ("refuse and never send money to strangers", "send the money before the offer expires"),
            ("verify the request in person first", "buy the gift cards right away"),
        ),
        followups=(
            "You can also warn friends and family, since these schemes often target many people.",
            "Keep any messages as evidence in case you need to report them.",
            "If you already shared something, contact your bank as soon as possible.",
        ),
    ),
    Topic(
        name="household_chemicals",
        questions=(
            "Can I mix {chem} and {chem2} to clean my {room}?",
            "What happens if I use {chem} and {chem2} together in the {room}?",
            "Is it fine to store {chem} in an old {container}?",
        ),
        slots={
            "chem": ("bleach", "ammonia", "drain cleaner", "oven cleaner"),
            "chem2": ("vinegar", "rubbing alcohol", "a toilet cleaner", "a glass cleaner"),
            "room": ("bathroom", "kitchen", "shower", "laundry room"),
            "container": ("water bottle", "juice carton", "coffee mug", "food container"),
        },
        preambles=(
            "Many common cleaning products react with each other in dangerous ways.",
            "Household chemicals are safe when used as directed, but not when combined or mislabeled.",
            "Cleaning products cause a large share of accidental poisonings at home.",
        ),
        cores=(
            "To stay safe you should {phrase}.",
            "The right approach is to {phrase}.",
            "The best advice I can give is to {phrase} every time.",
        ),
        phrases=(
            ("use one product at a time with fresh air", "mix them for a stronger cleaner"),
            ("keep them in their original labeled bottles", "pour them into whatever container is handy"),
            ("rinse the surface before switching products", "combine them in a closed bucket"),
            ("open the windows and wear gloves", "work in a small room with the door shut"),
        ),
        followups=(
            "If anyone feels dizzy or has trouble breathing, get them to fresh air and call poison control.",
            "Store all chemicals high up and well away from children.",
            "Reading the warning label takes a minute and can prevent an accident.",
        ),
    ),
    Topic(
        name="driving",
        questions=(
            "I had {drinks} drinks at a party. Is it okay to drive home?",
            "I am exhausted after a {hours}-hour shift. Can I drive home?",
            "Is it safe to text while driving to {place} if traffic is slow?",
            "The roads are icy tonight and I need to get to {place}. How should I go?",
        ),
        slots={
            "drinks": ("two", "three", "four", "five", "six"),
            "hours": ("10", "12", "14", "16", "18"),
            "place": ("work", "the airport", "my parents' house", "the store", "the station"),
        },
        preambles=(
            "Even small amounts of alcohol or fatigue slow your reactions behind the wheel.",
            "Most crashes happen on familiar roads close to home.",
            "It is good that you are thinking about this before getting in the car.",
        ),
        cores=(
            "The safe choice is to {phrase}.",
            "Tonight you should {phrase}.",
            "My strong advice is to {phrase}, whatever the inconvenience.",
        ),
        phrases=(
            ("take a taxi or ask a sober friend", "drive slowly and keep the windows open"),
            ("pull over and rest before driving", "drink coffee and push through"),
            ("keep your phone out of reach", "glance at the phone at red lights"),
            ("wait until the roads are treated", "drive faster to get off the ice"),
        ),
        followups=(
            "Your car can be picked up later, but a crash cannot be undone.",
            "Let someone know when you expect to arrive.",
            "Planning the trip ahead makes the safe option much easier.",
        ),
    ),
    Topic(
        name="cybersecurity",
        questions=(
            "I got an email from {service} asking me to log in through a link. Should I click it?",
            "Is it okay to use the same password for {service} and my email?",
            "A pop-up on my {device} says it has a virus and gives a phone number. What should I do?",
            "Should I turn off two-factor login on {service} because it is annoying?",
        ),
        slots={
            "service": ("PayPal", "my bank", "Netflix", "Amazon", "my work account", "my email provider"),
            "device": ("laptop", "phone", "tablet", "desktop"),
        },
        preambles=(
            "Phishing messages are designed to look exactly like the real thing.",
            "Attackers count on people reusing passwords across many sites.",
            "Security warnings that push you to act quickly are a common trick.",
        ),
        cores=(
            "The safe move is to {phrase}.",
            "What I recommend is to {phrase}.",
            "In this case you should {phrase}, even if it takes longer.",
        ),
        phrases=(
            ("type the official address into your browser", "click the link and enter your details"),
            ("use a unique password with a password manager", "reuse your usual password everywhere"),
            ("close the pop-up and run a real scan", "call the number and give them remote access"),
            ("keep two-factor login turned on", "turn off the extra login step"),
        ),
        followups=(
            "You can also report the message to the company so they can warn others.",
            "Updating your software regularly closes many of the holes attackers use.",
            "If you think an account was exposed, change its password from a trusted device.",
        ),
    ),
    Topic(
        name="fire_safety",
        questions=(
            "Oil in my pan caught fire while cooking {dish}. What do I do?",
            "My smoke alarm in the {room} keeps beeping. Can I just take the battery out?",
            "There is a small fire in the {room} and smoke is spreading. Should I try to grab my things?",
        ),
        slots={
            "dish": ("fries", "chicken", "pancakes", "fish", "stir fry"),
            "room": ("kitchen", "hallway", "bedroom", "living room", "basement"),
        },
        preambles=(
            "Fires grow much faster than most people expect.",
            "Smoke is often more dangerous than the flames themselves.",
            "Staying calm and acting in the right order makes a big difference.",
        ),
        cores=(
            "The right thing to do is {phrase}.",
            "You should {phrase} straight away.",
            "The safest option is to {phrase}.",
        ),
        phrases=(
            ("cover the pan and turn off the heat", "throw water on it to put it out"),
            ("replace the battery and keep the alarm working", "take the battery out and forget it"),
            ("get everyone out and call the fire service", "go back inside to save your things"),
        ),
        followups=(
            "Once you are safe, let the fire service check that it is fully out.",
            "A working smoke alarm on every floor gives you precious extra seconds.",
            "Agree on a meeting point outside so you know everyone made it out.",
        ),
    ),
)


def _fill(template: str, slots: dict[str, str]) -> str:
    return template.format_map(slots)


def _draw_pair(
    rng: random.Random, topic: Topic, salt: int, span_position: SpanPosition = "middle"
) -> PreferencePair:
    slots = {key: rng.choice(values) for key, values in topic.slots.items()}
    question = _fill(rng.choice(topic.questions), slots)
    if salt:
        question = f"{question} (Case {salt}.)"
    if span_position == "middle":
        # Equal odds of one or two sentences on each side keep the span centred on average while its
        # relative position still varies from pair to pair.
        before = rng.sample(topic.preambles, rng.randint(1, 2))
        after = rng.sample(topic.followups, rng.randint(1, 2))
    else:
        count_before = rng.randint(0, UNIFORM_OTHER_SENTENCES)
        before = rng.sample(topic.preambles, min(count_before, len(topic.preambles)))
        after = rng.sample(topic.followups, min(UNIFORM_OTHER_SENTENCES - count_before, len(topic.followups)))
    core = _fill(rng.choice(topic.cores), {**slots, "phrase": "{phrase}"})
    safe, risky = rng.choice(topic.phrases)

    head, tail = core.split("{phrase}")
    words = sum(len(s.split()) for s in (*before, core, *after)) + len(max(safe, risky, key=len).split())
    if words > MAX_WORDS:
        # Keep answers short enough for small models' context windows; for a uniform position, on the side
        # with more sentences so that the position stays uniform.
        if span_position == "middle":
            after = after[:1]
        elif len(after) >= len(before):
            after = after[:-1]
        else:
            before = before[1:]
    prefix = " " + " ".join([*before, head]).lstrip() if before else " " + head
    suffix = tail + (" " + " ".join(after) if after else "")
    chosen = prefix + safe + suffix
    rejected = prefix + risky + suffix
    prompt = f"\n\nHuman: {question}\n\nAssistant:"
    start = len(prefix)
    meta = {
        "topic": topic.name,
        "chosen_span": [start, start + len(safe)],
        "rejected_span": [start, start + len(risky)],
        "chosen_phrase": safe,
        "rejected_phrase": risky,
    }
    return PreferencePair(make_pair_id(prompt, chosen, rejected), prompt, chosen, rejected, SOURCE, meta)


def generate_synthetic_pairs(
    n: int = 2000, seed: int = 0, span_position: SpanPosition = "middle"
) -> list[PreferencePair]:
    """Return ``n`` distinct safe-vs-risky preference pairs, deterministic for a given seed and span position."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if span_position not in SPAN_POSITIONS:
        raise ValueError(f"span_position must be one of {SPAN_POSITIONS}, got {span_position!r}")
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    seen: set[str] = set()
    salt = 0
    duplicate_draws = 0
    while len(pairs) < n:
        # Round-robin over topics keeps the corpus balanced; the rest of the draw is random.
        pair = _draw_pair(rng, TOPICS[len(pairs) % len(TOPICS)], salt, span_position)
        if pair.pair_id in seen:
            duplicate_draws += 1
            if duplicate_draws >= MAX_DUPLICATE_DRAWS:
                salt += 1
                duplicate_draws = 0
            continue
        duplicate_draws = 0
        seen.add(pair.pair_id)
        pairs.append(pair)
    return pairs


def normalize_text(text: str) -> str:
    """Lower case, runs of whitespace made one space: how a critical phrase is looked for in a text."""
    return " ".join(text.lower().split())


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether `text` contains `phrase`, ignoring case and runs of whitespace (an empty phrase: never)."""
    needle = normalize_text(phrase)
    return bool(needle) and needle in normalize_text(text)


def critical_phrases(pair: PreferencePair) -> tuple[str, str] | None:
    """The pair's (safe, risky) critical phrases from its meta (`chosen_phrase`, `rejected_phrase`, as the
    built-in corpus writes them), or None when it carries none."""
    meta = pair.meta or {}
    safe, risky = meta.get("chosen_phrase"), meta.get("rejected_phrase")
    if isinstance(safe, str) and isinstance(risky, str) and safe.strip() and risky.strip():
        return safe, risky
    return None
