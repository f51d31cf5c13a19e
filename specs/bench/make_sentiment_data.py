"""Write the labelled data of specs/bench/sentiment.yaml: is a product or service review positive or negative?

    .venv/bin/python specs/bench/make_sentiment_data.py     # rewrites specs/bench/data/sentiment*.jsonl

Deterministic (seeded), from the phrase lists below, all written for this benchmark. Three kinds of
review, each its coverage category, each half positive and half negative:

- plain: one clear verdict ("The blender broke after two weeks.")
- mixed: a complaint and a praise, the overall verdict said after "but overall", "still" or "all in
  all" ("The instructions were confusing, but overall I'm very pleased with it.": positive)
- negated: the verdict through a negation ("Not bad at all.": positive; "I wouldn't call it great.":
  negative)

- data/sentiment.jsonl, the seed rows of the pool: 40 per kind (20 positive, 20 negative), 120 in all,
  about shop-bought products. The spec's augment entries grow them into the candidate pool (new
  product x verdict pairs from the spec's own lists, channel framings, a teacher-written rewording).
- data/sentiment_heldout.jsonl, the held-out eval source: 32 per kind, 96 in all, about services
  (dentists, airlines, plumbers, gyms) in other words and other frames (first-person stories, answers
  to "would you go back?"), no phrase shared with the pool.

Each row: {"text", "category" (the kind), "answer" (positive or negative)}.
"""

from __future__ import annotations

import random

from task_data import write_task

SEED = 13
PER_LABEL = 20

THINGS = ["The blender", "This phone case", "The desk lamp", "The running shoes", "The coffee machine",
          "This laptop bag", "The vacuum cleaner", "The headphones", "The garden hose", "This electric kettle",
          "The winter jacket", "The baby monitor", "The office chair", "This board game", "The toaster",
          "The yoga mat", "The bike lock", "This frying pan", "The smartwatch", "The suitcase"]
PLAIN = {
    "positive": ["works perfectly and was easy to set up", "is worth every penny", "arrived early and well packed",
                 "has made my mornings so much easier", "feels solid and looks great", "does exactly what it promises",
                 "is the best purchase I've made this year", "still works like new after six months"],
    "negative": ["broke after two weeks", "was a complete waste of money", "arrived scratched and missing parts",
                 "stopped working after the first use", "feels cheap and rattles", "does nothing the listing promises",
                 "is the worst purchase I've made this year", "fell apart within a month"],
}
# mixed: (a complaint, the positive verdict) or (a praise, the negative verdict)
MINOR = {
    "positive": ["The instructions were confusing", "Delivery took a few extra days", "It's a little louder than I expected",
                 "The colour is slightly darker than in the photos", "The cable is on the short side",
                 "Setting it up took me an hour"],
    "negative": ["The packaging was lovely", "The colour is exactly as pictured", "Delivery was quick",
                 "It looks nice on the shelf", "The price seemed fair", "Customer service was polite"],
}
OVERALL = {
    "positive": ["but overall I'm very pleased with it", "but overall it does the job brilliantly",
                 "but all in all I'd happily buy it again", "but overall it's a great product",
                 "still, I'm glad I bought it"],
    "negative": ["but overall it was a disappointment", "but overall I regret buying it",
                 "but all in all I wouldn't recommend it", "but overall it's not worth the money",
                 "still, I'm sending it back"],
}
NEGATED = {
    "positive": ["Not bad at all", "I can't find a single thing to complain about", "I was not disappointed in the least",
                 "Never had one problem with it", "I couldn't be happier with it", "No regrets whatsoever",
                 "It didn't let me down once", "I wasn't expecting much, but it's excellent"],
    "negative": ["I wouldn't call it great", "Not worth the price", "I can't say I'd recommend it",
                 "It never works when I need it", "Not what I'd call reliable", "I wasn't impressed",
                 "It doesn't do half of what it should", "Nothing about it feels well made"],
}

# Held-out: services instead of products, other phrases, other frames. Written whole.
HELDOUT = {
    "plain": {
        "positive": ["Our plumber turned up on time, fixed the leak in twenty minutes and charged what he quoted.",
                     "Would I fly with them again? In a heartbeat, the crew were wonderful.",
                     "My dentist explained every step and the filling didn't hurt one bit.",
                     "The moving company packed our whole flat in a morning without a scratch.",
                     "Best haircut I've had in years, and the barber remembered my name.",
                     "I booked the cleaning service twice and both times the house sparkled.",
                     "The driving instructor was patient and I passed first time.",
                     "Friendly gym staff, spotless changing rooms and classes that start on time.",
                     "The vet squeezed us in the same day and our dog was back to normal by evening.",
                     "Went back to that bakery three times in one week, it's that good.",
                     "The car rental desk had us on the road in five minutes.",
                     "The photographer captured our wedding beautifully, we cried looking at the album.",
                     "Tax adviser sorted out years of paperwork and saved us money.",
                     "The bank's app is fast, clear and has never crashed on me.",
                     "Our tour guide made the old town come alive, worth every cent.",
                     "The locksmith came at midnight and was kind and quick."],
        "negative": ["The plumber left a bigger leak than the one he came to fix.",
                     "Would I fly with them again? Never, they lost both our bags.",
                     "My dentist rushed the appointment and I'm still in pain a week later.",
                     "The movers broke our mirror and then stopped answering calls.",
                     "Worst haircut of my life, I had to wear a hat for a month.",
                     "The cleaners skipped half the rooms and still charged the full fee.",
                     "The driving instructor spent the lessons on his phone.",
                     "The gym is filthy and half the machines have been broken for months.",
                     "We waited three hours at the vet and nobody told us why.",
                     "That bakery sold me stale bread twice in one week.",
                     "The car rental firm charged us for a dent that was already there.",
                     "The wedding photographer sent blurry pictures two months late.",
                     "The tax adviser filed the wrong forms and we paid a fine.",
                     "The bank's app logs me out every few minutes and loses my transfers.",
                     "Our tour guide read from his notes and lost half the group.",
                     "The locksmith overcharged us and the new lock jams."],
    },
    "mixed": {
        "positive": ["The waiting room was cramped; still, the physio fixed my shoulder in three sessions.",
                     "Check-in at the airport was chaotic, though the flight itself was smooth and the crew lovely. Would fly again.",
                     "The electrician's quote was higher than others, yet the work was flawless and I'd hire him again.",
                     "Parking at the clinic is a nightmare. That aside, the doctors were excellent.",
                     "The app looks dated, but it's the most dependable bank I've used.",
                     "Our guide was ten minutes late; once we got going, it was the highlight of the trip.",
                     "Booking online was fiddly. The salon itself? Fantastic, I'm going back next month.",
                     "The gym's music is far too loud, but the trainers are brilliant and I've never been fitter.",
                     "The removal van arrived late, yet every box made it intact and the crew were cheerful.",
                     "The garage took longer than promised; even so, the car runs better than ever.",
                     "The only downside was the noisy street outside; the B&B was otherwise perfect.",
                     "The menu is small and the chairs are hard, but the food made up for it and we'll be back.",
                     "Customer support put me on hold for ages, though they solved the problem for good in the end.",
                     "The course materials had typos, but the teacher was inspiring and I learned loads.",
                     "A pricey taxi ride, admittedly, but the driver was careful and got us there on time.",
                     "The laundry service lost a sock, but everything else came back fresh and neatly folded."],
        "negative": ["The waiting room was comfortable; sadly, the physio made my shoulder worse.",
                     "Check-in was smooth, but the flight was delayed six hours and nobody told us anything. Never again.",
                     "The electrician was friendly, yet the sockets he fitted stopped working within a week.",
                     "Parking at the clinic is easy. The care, however, was careless and rushed.",
                     "The app looks modern, but the bank behind it ignores every complaint.",
                     "Our guide was punctual; unfortunately, the tour was dull and far too long.",
                     "Booking online was easy. The salon itself? A disaster, my hair is ruined.",
                     "The gym has good music, but the trainers are rude and the place is always overcrowded.",
                     "The removal crew were cheerful, yet half our boxes arrived crushed.",
                     "The garage was quick; sadly, the same fault came back two days later.",
                     "The location was great; the B&B itself was damp, noisy and overpriced.",
                     "The menu looked tempting and the chairs were comfy, but the food was cold and bland.",
                     "Customer support answered fast, though nothing they suggested fixed anything.",
                     "The course materials were neat, but the teacher was unprepared and I learned nothing.",
                     "The taxi was clean, admittedly, but the driver took a detour and doubled the fare.",
                     "The laundry service was cheap, but my shirts came back stained and creased."],
    },
    "negated": {
        "positive": ["Hardly a thing went wrong during the whole renovation.",
                     "The dentist? Far from scary, actually gentle and reassuring.",
                     "Can't fault the hotel staff on anything.",
                     "No complaints from me about the airline this time.",
                     "The wait at the clinic was nowhere near as long as I feared.",
                     "I didn't expect a cheap gym to be this good, but it is.",
                     "Not once did the removal men lose their patience with us.",
                     "Nobody could have done a better job with our garden.",
                     "I doubt I'll ever use another plumber.",
                     "There was nothing to dislike about the cooking class.",
                     "The car rental wasn't the hassle I'd been warned about at all, it was easy.",
                     "Never felt rushed at the salon, they took real care.",
                     "The tour was anything but boring.",
                     "I won't hesitate to call this electrician again.",
                     "The bank's helpline isn't slow at all, someone picked up straight away.",
                     "Not a single crumb of that wedding cake was left, everyone loved it."],
        "negative": ["Hardly anything went right during the whole renovation.",
                     "The dentist? Far from gentle, I left shaking.",
                     "Can't say the hotel staff cared about anything.",
                     "No one at the airline seemed to know where our bags were.",
                     "The wait at the clinic was nowhere near the half hour they promised.",
                     "I didn't expect much from a cheap gym, and it still disappointed me.",
                     "Not once did the removal men arrive on time.",
                     "Nobody at the garden centre could answer a simple question.",
                     "I doubt I'll ever use that plumber again.",
                     "There was nothing to enjoy about the cooking class.",
                     "The car rental wasn't the bargain it claimed to be, hidden fees everywhere.",
                     "Never felt welcome at the salon.",
                     "The tour was anything but informative.",
                     "I won't be calling this electrician again.",
                     "The bank's helpline isn't helpful in the slightest.",
                     "Not a single guest finished that wedding cake, it was dry as dust."],
    },
}


def _clause(text: str) -> str:
    return text[0].lower() + text[1:]


def pool(seed: int = SEED) -> list[dict]:
    rows = []
    for label in ("positive", "negative"):
        rng = random.Random(f"{seed}-{label}")
        plain = rng.sample([(t, p) for t in THINGS for p in PLAIN[label]], PER_LABEL)
        rows += [{"text": f"{t} {p}.", "category": "plain", "answer": label} for t, p in plain]
        mixed = rng.sample([(m, o) for m in MINOR[label] for o in OVERALL[label]], PER_LABEL)
        rows += [{"text": f"{m}, {o}.", "category": "mixed", "answer": label} for m, o in mixed]
        negated = rng.sample([(t, n) for t in THINGS for n in NEGATED[label]], PER_LABEL)
        rows += [{"text": f"{t}? {n}.", "category": "negated", "answer": label} for t, n in negated]
    random.Random(seed).shuffle(rows)
    return rows


def heldout() -> list[dict]:
    rows = [{"text": t, "category": kind, "answer": label}
            for kind, by_label in HELDOUT.items() for label, texts in by_label.items() for t in texts]
    random.Random(SEED).shuffle(rows)
    return rows


def main() -> None:
    write_task("sentiment", pool(), heldout())


if __name__ == "__main__":
    main()
