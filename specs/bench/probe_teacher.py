"""Which task does the bundled teacher really answer? Accuracy of candidate tasks against gold.

    HF_HUB_OFFLINE=1 SYLLABUS_THREADS=1 .venv/bin/python specs/bench/probe_teacher.py [--only NAME,...]

Four tasks (hotel-review sentiment, the language of a sentence, spam or not, question or
statement), 30-60 labelled inputs each written here, and for each several wordings of a detailed
instruction (what the labels mean, what to answer; never examples: a few-shot prompt inside one
user turn makes this teacher echo its examples). The teacher (smollm2-135m-instruct through its
chat template) answers greedily, max_new_tokens 8, batched as `syllabus run` does; its reply is
matched to the labels the way `syllabus eval` does (engine.teachers.answers.normalise_answer: the
one label the reply names). Prints accuracy with its 95% Wilson interval and the confusion per
candidate; each wording's score is noted beside it below. bench/students.py's second task
(specs/bench/language.yaml, templates/bench_language_teacher.j2) is `language/chosen`, also
checked on a sample of its own pool and on its held-out set (`--only all` runs every wording).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.models import chat_prompt_ids, load_causal_lm  # noqa: E402
from engine.teachers.answers import normalise_answer  # noqa: E402
from engine.train.evaluate import generate_texts, wilson  # noqa: E402

HOTEL_INSTRUCTION = (
    "You read guest reviews of hotels. Decide how the guest felt about the stay overall.\n"
    "positive: the guest was satisfied overall (would stay again or recommend it), even if a small flaw is mentioned.\n"
    "negative: the guest was dissatisfied overall (complaints outweigh the rest), even if something good is mentioned.\n"
    "Answer with one word: positive or negative.\n\nReview: {text}"
)
HOTEL = [
    ("The room was spotless, the bed was huge and the staff remembered our names by the second day.", "positive"),
    ("Check-in took forty minutes and nobody apologised. The room smelled of smoke.", "negative"),
    ("Great location right next to the station, and breakfast had plenty of fresh fruit.", "positive"),
    ("The shower was cold every morning and reception kept saying they would fix it tomorrow.", "negative"),
    ("Quiet, comfortable and good value. I would book it again without thinking twice.", "positive"),
    ("We were given a room next to the lift and heard it all night. Never again.", "negative"),
    ("Lovely view of the harbour from our balcony, and the rooftop bar was a treat.", "positive"),
    ("Stained sheets, a broken kettle and a bathroom that clearly had not been cleaned.", "negative"),
    ("The pool was a bit small, but the staff were so kind that we did not care. Wonderful week.", "positive"),
    ("The lobby looks impressive, but our room was tiny, dark and overpriced.", "negative"),
    ("Friendly front desk, fast wifi and a really comfortable mattress. Exactly what I needed for a work trip.", "positive"),
    ("They charged my card twice and it took three weeks of emails to get the money back.", "negative"),
    ("Our kids loved the play area and the family room had plenty of space for all of us.", "positive"),
    ("The air conditioning rattled all night and the window would not open. I barely slept.", "negative"),
    ("A charming old building with creaky floors, but the welcome was warm and the breakfast superb.", "positive"),
    ("Parking cost a fortune, the restaurant was closed, and the gym was a single broken treadmill.", "negative"),
    ("Staff upgraded us for our anniversary and left chocolates in the room. Such a nice touch.", "positive"),
    ("The photos online must be ten years old. Peeling paint and a mouldy ceiling.", "negative"),
    ("Clean, modern and five minutes from the beach. Highly recommended.", "positive"),
    ("Housekeeping walked in on us twice despite the do-not-disturb sign.", "negative"),
    ("Not fancy, but everything worked, the bed was soft and the price was fair.", "positive"),
    ("Loud music from the bar downstairs until 3am, every single night.", "negative"),
    ("The concierge booked us a table at a fantastic little restaurant and even arranged the taxi.", "positive"),
    ("Our booking had vanished when we arrived and we had to find another hotel at midnight.", "negative"),
    ("I did not expect much for the price, but it was honestly one of the best stays I have had.", "positive"),
    ("Nice enough staff, but the noise from the road and the thin walls ruined the trip.", "negative"),
    ("Spacious suite, great spa and a breakfast buffet I still think about.", "positive"),
    ("The towels were threadbare and there was hair in the sink when we checked in.", "negative"),
    ("Easy check-in, helpful staff and a very quiet room at the back. Would stay again.", "positive"),
    ("Wifi only worked in the lobby, which made working from the room impossible.", "negative"),
]
LANGUAGE_INSTRUCTION = (
    "You identify the language a sentence is written in. The possible languages are English, French, Spanish and German.\n"
    "Answer with one word: the name of the language in English (english, french, spanish or german).\n\nSentence: {text}"
)
LANGUAGE = [
    ("Where is the nearest train station?", "english"), ("Où est la gare la plus proche ?", "french"),
    ("¿Dónde está la estación de tren más cercana?", "spanish"), ("Wo ist der nächste Bahnhof?", "german"),
    ("I will call you back after the meeting.", "english"), ("Je te rappelle après la réunion.", "french"),
    ("Te llamo después de la reunión.", "spanish"), ("Ich rufe dich nach dem Meeting zurück.", "german"),
    ("The soup was too salty for my taste.", "english"), ("La soupe était trop salée à mon goût.", "french"),
    ("La sopa estaba demasiado salada para mi gusto.", "spanish"), ("Die Suppe war mir zu salzig.", "german"),
    ("My brother lives in a small village by the sea.", "english"), ("Mon frère habite dans un petit village au bord de la mer.", "french"),
    ("Mi hermano vive en un pueblo pequeño junto al mar.", "spanish"), ("Mein Bruder wohnt in einem kleinen Dorf am Meer.", "german"),
    ("Could you open the window, please?", "english"), ("Pourrais-tu ouvrir la fenêtre, s'il te plaît ?", "french"),
    ("¿Podrías abrir la ventana, por favor?", "spanish"), ("Könntest du bitte das Fenster öffnen?", "german"),
    ("We are going to the cinema tonight.", "english"), ("Nous allons au cinéma ce soir.", "french"),
    ("Vamos al cine esta noche.", "spanish"), ("Wir gehen heute Abend ins Kino.", "german"),
    ("It has been raining all week.", "english"), ("Il pleut depuis toute la semaine.", "french"),
    ("Ha estado lloviendo toda la semana.", "spanish"), ("Es regnet schon die ganze Woche.", "german"),
    ("The children are playing in the garden.", "english"), ("Les enfants jouent dans le jardin.", "french"),
    ("Los niños están jugando en el jardín.", "spanish"), ("Die Kinder spielen im Garten.", "german"),
    ("I forgot my keys at the office.", "english"), ("J'ai oublié mes clés au bureau.", "french"),
    ("Olvidé mis llaves en la oficina.", "spanish"), ("Ich habe meine Schlüssel im Büro vergessen.", "german"),
    ("How much does this jacket cost?", "english"), ("Combien coûte cette veste ?", "french"),
    ("¿Cuánto cuesta esta chaqueta?", "spanish"), ("Wie viel kostet diese Jacke?", "german"),
    ("She reads a book every evening before bed.", "english"), ("Elle lit un livre chaque soir avant de dormir.", "french"),
    ("Ella lee un libro cada noche antes de dormir.", "spanish"), ("Sie liest jeden Abend vor dem Schlafen ein Buch.", "german"),
    ("Our flight was delayed by two hours.", "english"), ("Notre vol a été retardé de deux heures.", "french"),
    ("Nuestro vuelo se retrasó dos horas.", "spanish"), ("Unser Flug hatte zwei Stunden Verspätung.", "german"),
    ("Please send me the report by Friday.", "english"), ("Merci de m'envoyer le rapport d'ici vendredi.", "french"),
    ("Por favor, envíame el informe antes del viernes.", "spanish"), ("Bitte schick mir den Bericht bis Freitag.", "german"),
    ("The museum is closed on Mondays.", "english"), ("Le musée est fermé le lundi.", "french"),
    ("El museo está cerrado los lunes.", "spanish"), ("Das Museum ist montags geschlossen.", "german"),
    ("I would like a coffee with milk.", "english"), ("Je voudrais un café au lait.", "french"),
    ("Quisiera un café con leche.", "spanish"), ("Ich hätte gern einen Kaffee mit Milch.", "german"),
]
SPAM_INSTRUCTION = (
    "You sort text messages. Decide whether the message is spam.\n"
    "spam: unsolicited advertising, prize or lottery claims, requests to click a link or send money or codes, scams.\n"
    "normal: a message from someone the reader knows or a genuine service, about ordinary matters.\n"
    "Answer with one word: spam or normal.\n\nMessage: {text}"
)
SPAM = [
    ("Congratulations! You have won a $1000 gift card. Click here to claim your prize now.", "spam"),
    ("Hey, are we still on for lunch tomorrow at 12?", "normal"),
    ("URGENT: your bank account has been suspended. Verify your details at secure-bank-login.net", "spam"),
    ("Can you pick up milk on your way home?", "normal"),
    ("Lose 10 kg in 2 weeks with this one weird trick! Order today and get 50% off.", "spam"),
    ("Running ten minutes late, sorry! Save me a seat.", "normal"),
    ("You have been selected for a free cruise to the Bahamas. Reply YES to book.", "spam"),
    ("Happy birthday! Hope you have a lovely day, see you on Saturday.", "normal"),
    ("Your parcel could not be delivered. Pay the 1.99 fee here to reschedule: bit.ly/parcel-fee", "spam"),
    ("The dentist moved your appointment to Thursday at 3pm.", "normal"),
    ("Earn $500 a day working from home, no experience needed. Text JOB to 80080.", "spam"),
    ("Did you remember to feed the cat this morning?", "normal"),
    ("Final notice: claim your unpaid tax refund within 24 hours or lose it.", "spam"),
    ("Thanks for dinner last night, it was delicious.", "normal"),
    ("Hot singles in your area want to meet you. Sign up free now!", "spam"),
    ("I left the keys under the mat, the door code is the same as before.", "normal"),
    ("Your Netflix subscription has expired. Update your payment details at netflx-account.com", "spam"),
    ("Mum says dinner is at 7, don't be late.", "normal"),
    ("WINNER!! Your number was drawn in our monthly lottery. Call 0900 123 456 to collect.", "spam"),
    ("The meeting is moved to room 4B, see you there.", "normal"),
    ("Buy cheap watches and designer bags, 90% off, limited stock!", "spam"),
    ("Can you send me the photos from the wedding?", "normal"),
    ("Send me the six-digit code you just received so I can verify your account.", "spam"),
    ("Your order has shipped and will arrive on Tuesday.", "normal"),
    ("Exclusive offer: get a new iPhone for just $1. Tap the link before midnight.", "spam"),
    ("Football practice is cancelled because of the rain.", "normal"),
    ("Invest now in our crypto fund and double your money in a week, guaranteed.", "spam"),
    ("Could you water my plants while I'm away next week?", "normal"),
    ("Dear customer, you qualify for a pre-approved loan of 20,000. Reply to accept.", "spam"),
    ("I finished the report, it's in the shared folder.", "normal"),
]
QUESTION_INSTRUCTION = (
    "You classify sentences by their form. Decide whether the sentence asks something or tells something.\n"
    "question: the sentence asks for information or an answer, even without a question mark.\n"
    "statement: the sentence states a fact, opinion or event, even when it mentions a question.\n"
    "Answer with one word: question or statement.\n\nSentence: {text}"
)
QUESTION = [
    ("What time does the library open on Sundays?", "question"), ("The library opens at ten on Sundays.", "statement"),
    ("Is there any coffee left in the pot?", "question"), ("There is still some coffee in the pot.", "statement"),
    ("How long does it take to drive to the airport?", "question"), ("It takes about forty minutes to drive to the airport.", "statement"),
    ("Do you know where I left my glasses?", "question"), ("I left my glasses on the kitchen table.", "statement"),
    ("Why is the sky blue", "question"), ("The sky looks blue because of how air scatters sunlight.", "statement"),
    ("Can I bring my dog to the party?", "question"), ("Dogs are welcome at the party.", "statement"),
    ("Which train goes to the city centre", "question"), ("The number 4 train goes to the city centre.", "statement"),
    ("Have you ever been to Portugal?", "question"), ("We spent two weeks in Portugal last summer.", "statement"),
    ("Who wrote this song?", "question"), ("My sister wrote this song when she was sixteen.", "statement"),
    ("Should I bring an umbrella today?", "question"), ("You should bring an umbrella today.", "statement"),
    ("Where can I buy stamps around here", "question"), ("The shop on the corner sells stamps.", "statement"),
    ("Are the tickets refundable?", "question"), ("The tickets are not refundable.", "statement"),
    ("When does the sale end?", "question"), ("The sale ends on Friday night.", "statement"),
    ("Did anyone see my blue scarf?", "question"), ("Someone found a blue scarf in the hall.", "statement"),
    ("How do I reset my password?", "question"), ("I reset my password yesterday.", "statement"),
    ("Would you like some more tea?", "question"), ("I would like some more tea.", "statement"),
    ("I wonder whether the shop is still open.", "statement"), ("She asked me what time it was.", "statement"),
    ("Could you tell me the way to the museum?", "question"), ("The museum is two streets away.", "statement"),
    ("What is the capital of Australia?", "question"), ("Canberra is the capital of Australia.", "statement"),
    ("Is it going to snow this weekend?", "question"), ("It is going to snow this weekend.", "statement"),
    ("Can you recommend a good book?", "question"), ("This is a really good book.", "statement"),
    ("How many people are coming to dinner?", "question"), ("Eight people are coming to dinner.", "statement"),
    ("Does this bus stop at the hospital?", "question"), ("This bus stops at the hospital.", "statement"),
    ("What did the doctor say?", "question"), ("The doctor said I need more rest.", "statement"),
    ("Why did the meeting get cancelled", "question"), ("The meeting got cancelled because the manager is ill.", "statement"),
    ("Where are you going on holiday?", "question"), ("We are going to Greece on holiday.", "statement"),
    ("Is this seat taken?", "question"), ("This seat is taken.", "statement"),
]
# Every wording tried, with what it scored here (greedy, max_new_tokens 8, one run on 2 shared cores).
# Instruction first, labels defined / listed:
#   hotel 16/30, language 15/60, spam 2/30, question 2/54 (echoes the definitions, or one answer to all).
# The input first, the question after it, labels defined / listed:
HOTEL_AFTER = (  # 3/30: "The sentiment of this review is neutral."
    "Here is a guest review of a hotel.\n\nReview: {text}\n\n"
    "A review is positive when the guest was satisfied with the stay overall, even if it mentions a small flaw, "
    "and negative when the complaints outweigh the rest, even if it mentions something good. "
    "Is the sentiment of this review positive or negative? Answer with one word."
)
LANGUAGE_AFTER = (  # 12/60: "This sentence is written in English, French"
    "Sentence: {text}\n\nWhich language is this sentence written in: English, French, Spanish or German? "
    "Answer with the name of the language only."
)
SPAM_AFTER = (  # 14/30: nearly everything "normal"
    "Text message: {text}\n\nSpam means unsolicited advertising, prize or lottery claims, and requests to click "
    "a link or to send money or codes. Is this text message spam or normal? Answer with one word."
)
QUESTION_AFTER = (  # 26/54: everything "question"
    "Sentence: {text}\n\nA question asks for information, even without a question mark; a statement tells "
    "something. Is this sentence a question or a statement? Answer with one word."
)
# The question first, as the demo's teacher prompt (templates/sentiment_teacher.j2), with a definition:
HOTEL_FIRST = (  # 15/30: everything "positive"
    "Is the sentiment of the following hotel review positive or negative? It is positive when the guest was "
    "satisfied with the stay overall, and negative when the complaints outweigh the rest. Answer with one word."
    "\n\nReview: {text}"
)
LANGUAGE_FIRST = (  # 6/60: continues the sentence in its language
    "Which language is the following sentence written in: French, Spanish, German or English? "
    "Answer with one word.\n\nSentence: {text}"
)
SPAM_FIRST = (  # 15/30: "This text message is not spam, but" (names "spam")
    "Is the following text message spam or normal? Spam is unsolicited advertising, a prize or lottery claim, "
    "or a request to click a link or send money or codes. Answer with one word.\n\nMessage: {text}"
)
QUESTION_FIRST = (  # 19/54
    "Is the following sentence a question or a statement? A question asks for information; a statement "
    "tells something. Answer with one word.\n\nSentence: {text}"
)
# Plain questions, no definitions:
HOTEL_DEMO = (  # 26/30: the demo's own prompt; "hotel review" in it: 22/30; a role sentence before it: 25/30
    "Is the sentiment of the following review positive or negative? Answer with one word.\n\nReview: {text}"
)
LANGUAGE_PLAIN = (  # 53/60 (with "What language ... Answer with one word.": 51/60)
    "What language is the following sentence written in? Answer with one word, the name of the language."
    "\n\nSentence: {text}"
)
LANGUAGE_RULE_FIRST = (  # 54/60 here, but 54/80 on a sample of specs/bench/data/language.jsonl
    "What language is the following sentence written in? Judge by its words and grammar, not by the names of "
    "people or places in it. Answer with one word, the name of the language.\n\nSentence: {text}"
)
# Chosen (templates/bench_language_teacher.j2): the sentence first, then the instruction with its rule.
LANGUAGE_CHOSEN = (  # 59/60 here; 73/80 on the pool sample; 60/64 on the held-out set
    "Sentence: {text}\n\nWhat language is the sentence above written in? Judge by its words and grammar, not by "
    "the names of people or places in it. Answer with one word, the name of the language."
)


def _language_rows(which: str) -> list[tuple[str, str]]:
    """20 pool rows per language (seeded), or the held-out set, from make_language_data."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_language_data as data

    if which == "heldout":
        return [(r["text"], r["answer"]) for r in data.heldout()]
    rng, by = random.Random(1), {}
    for r in data.pool():
        by.setdefault(r["answer"], []).append(r)
    return [(r["text"], r["answer"]) for language in by for r in rng.sample(by[language], 20)]


CANDIDATES = {  # name: (instruction, rows); a callable rows is built when asked for
    "hotel_sentiment/defined": (HOTEL_INSTRUCTION, HOTEL),
    "hotel_sentiment/after": (HOTEL_AFTER, HOTEL),
    "hotel_sentiment/first": (HOTEL_FIRST, HOTEL),
    "hotel_sentiment/demo": (HOTEL_DEMO, HOTEL),
    "language/defined": (LANGUAGE_INSTRUCTION, LANGUAGE),
    "language/after": (LANGUAGE_AFTER, LANGUAGE),
    "language/first": (LANGUAGE_FIRST, LANGUAGE),
    "language/plain": (LANGUAGE_PLAIN, LANGUAGE),
    "language/rule-first": (LANGUAGE_RULE_FIRST, LANGUAGE),
    "language/chosen": (LANGUAGE_CHOSEN, LANGUAGE),
    "language/chosen-pool": (LANGUAGE_CHOSEN, lambda: _language_rows("pool")),
    "language/chosen-heldout": (LANGUAGE_CHOSEN, lambda: _language_rows("heldout")),
    "spam/defined": (SPAM_INSTRUCTION, SPAM),
    "spam/after": (SPAM_AFTER, SPAM),
    "spam/first": (SPAM_FIRST, SPAM),
    "question/defined": (QUESTION_INSTRUCTION, QUESTION),
    "question/after": (QUESTION_AFTER, QUESTION),
    "question/first": (QUESTION_FIRST, QUESTION),
}
DEFAULT = ["hotel_sentiment/demo", "spam/first", "question/after", "language/chosen", "language/chosen-pool",
           "language/chosen-heldout"]


def probe(model, tokenizer, instruction: str, rows: list[tuple[str, str]], max_new: int, batch: int) -> dict:
    labels = {label for _, label in rows}
    prompts = [chat_prompt_ids(tokenizer, instruction.format(text=text)) for text, _ in rows]
    start = time.perf_counter()
    replies = generate_texts(model, tokenizer, prompts, max_new, batch)
    seconds = time.perf_counter() - start
    answers = [normalise_answer(r, labels) for r in replies]
    right = [a == gold for a, (_, gold) in zip(answers, rows)]
    confusion = Counter((gold, a if a in labels else "no answer") for a, (_, gold) in zip(answers, rows))
    wrong = [(text, gold, reply) for (text, gold), reply, ok in zip(rows, replies, right) if not ok]
    return {"n": len(rows), "correct": sum(right), "seconds": seconds, "confusion": confusion, "wrong": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT), help="candidates to probe, comma-separated "
                        "(default: each task's best wording and the chosen one on the bench's data; all: every one)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--show-wrong", type=int, default=6, help="wrong replies printed per candidate")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    for name in CANDIDATES if args.only == "all" else args.only.split(","):
        instruction, rows = CANDIDATES[name]
        rows = rows() if callable(rows) else rows
        r = probe(model, tokenizer, instruction, rows, args.max_new_tokens, args.batch)
        lo, hi = wilson(r["correct"], r["n"])
        print(f"{name}: {r['correct']}/{r['n']} = {100 * r['correct'] / r['n']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] "
              f"({r['seconds']:.0f} s, {r['seconds'] / r['n']:.2f} s per input)")
        print("  confusion (gold -> answer): " + ", ".join(f"{g}->{a} {k}" for (g, a), k in sorted(r["confusion"].items())))
        for text, gold, reply in r["wrong"][: args.show_wrong]:
            print(f"  wrong: gold {gold}, reply {reply!r}: {text[:80]}")


if __name__ == "__main__":
    main()
