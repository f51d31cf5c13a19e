"""Write the labelled data of specs/bench/topic.yaml: the topic of a news headline.

    .venv/bin/python specs/bench/make_topic_data.py     # rewrites specs/bench/data/topic*.jsonl

Deterministic (seeded), from the phrase lists below, all written for this benchmark:

- data/topic.jsonl, the seed rows of the pool: per topic (sports, business, science, politics)
  45 headlines, each a subject of that topic with one of its events ("Harbour City FC sacks its
  manager after a fifth straight defeat"), 180 in all. The spec's augment entries grow them into
  the candidate pool (new subject x event pairs from the spec's own lists, news framings, and a
  teacher-written rewording).
- data/topic_heldout.jsonl, the held-out eval source: 25 per topic from other lists and other
  frames (questions, quotes, "what it means" explainers, live-blog lines), no subject or event
  phrase shared with the pool, 100 in all.

Each row: {"text", "category" (the topic: the coverage bucket), "answer" (the gold label)}.
"""

from __future__ import annotations

import random

from task_data import write_task

SEED = 11
PER_TOPIC = 45

# Singular subjects and present-tense events, so any pair of one topic reads as a headline.
SUBJECTS = {
    "sports": ["Harbour City FC", "The national rugby team", "Veteran sprinter Ana Ruiz", "The home side",
               "Northfield United", "The women's hockey squad", "Tennis star Mira Patel", "The league leader",
               "The Olympic rowing crew", "Teenage goalkeeper Leo Brandt", "The cricket board", "The cycling team"],
    "business": ["Carmaker Voltek", "The supermarket chain Greenbasket", "Oil giant Petrona", "Budget airline SkyHop",
                 "The country's largest bank", "Retailer Maple & Co", "Chipmaker Siltron", "The steel group Ferrum",
                 "Online lender Quickfund", "The brewing giant Hopwell", "Insurer Safeharbour", "Shipping firm Bluewake"],
    "science": ["A team of astronomers", "Researchers at the university hospital", "The European space agency",
                "Marine biologists", "A new study of 40,000 patients", "Physicists at the national laboratory",
                "Geneticists", "Climate scientists", "A robotics lab", "Software engineers at an AI startup",
                "Palaeontologists", "The Mars rover team"],
    "politics": ["The prime minister", "The opposition leader", "The Senate", "The finance minister",
                 "The ruling coalition", "Parliament", "The governor", "The foreign secretary",
                 "The president", "Election officials", "The health minister", "A cross-party committee"],
}
EVENTS = {
    "sports": ["sacks its manager after a fifth straight defeat", "wins the cup final on penalties",
               "signs a striker on a five-year contract", "breaks the national 100m record",
               "is knocked out in the quarter-finals", "celebrates promotion after a late winner",
               "loses its unbeaten run away from home", "names a new captain for the season",
               "pulls out of the tournament with a knee injury", "comes back from two goals down to draw",
               "clinches the league title with two games to spare", "is fined for fielding an ineligible player"],
    "business": ["cuts 2,000 jobs as profits slump", "reports record quarterly revenue",
                 "agrees a takeover worth 4 billion dollars", "shares jump after earnings beat forecasts",
                 "raises prices for the third time this year", "opens its first factory in Asia",
                 "names a new chief executive", "is fined over misleading customers",
                 "plans to list on the stock exchange", "warns of weaker sales in the second half",
                 "closes 80 stores across the country", "posts a surprise annual loss"],
    "science": ["discovers a planet that may hold liquid water", "finds a gene linked to early hearing loss",
                "launches a satellite to map the ocean floor", "builds a battery that charges in five minutes",
                "reports a faster test for bacterial infections", "identifies a new species of deep-sea fish",
                "trains a language model on medical records", "measures the fastest melting of a glacier yet",
                "unveils a robot that sorts recycling", "dates a fossil to 300 million years ago",
                "sends back the sharpest images of the moon's south pole", "develops a vaccine candidate for malaria"],
    "politics": ["calls a snap election for next spring", "survives a vote of no confidence",
                 "announces a cabinet reshuffle", "pledges to cut income tax in the budget",
                 "faces a rebellion over the immigration bill", "signs a trade deal with neighbouring states",
                 "resigns after the expenses scandal", "vetoes the defence spending bill",
                 "promises a referendum on electoral reform", "blocks the opposition's motion on housing",
                 "meets union leaders to end the strike", "wins a second term by a narrow margin"],
}

# Held-out: other subjects, other events, other frames. Written whole, not combined.
HELDOUT = {
    "sports": ["Can anyone stop the defending champions in this year's marathon?",
               "'We were simply not good enough,' admits coach after heavy derby loss",
               "Live: second day of the swimming championships", "Five things we learned from the weekend's matches",
               "Why the new offside rule has managers fuming", "Jockey banned for twelve days after whip offence",
               "Ice hockey: late power-play goal seals playoff spot", "Golfer shoots 62 to take a three-shot lead",
               "Basketball franchise trades its top scorer for two draft picks",
               "Cyclist crashes out of the mountain stage", "Boxing: undisputed champion retains belts on points",
               "Fans protest over ticket prices before kick-off", "Skier takes gold in the giant slalom",
               "What the transfer window means for the title race", "Referee attacked during amateur match",
               "Chess grandmaster wins the world blitz crown", "Darts: underdog beats the world number one",
               "Is this the end for the ageing midfield?", "Formula One: rain delays the start of the grand prix",
               "Volleyball team reaches its first ever world final", "Paralympic archer sets a world mark",
               "Club statement: manager to step down at end of season",
               "Netball: home crowd roars side to victory", "Sailing crew capsizes on the final leg",
               "Wrestler tests positive for a banned substance"],
    "business": ["Should you fix your mortgage now? Rates explained", "'Demand has collapsed,' says furniture maker's boss",
                 "Live: markets react to the interest rate decision", "Five things to know before the stock market opens",
                 "Why coffee prices are at a ten-year high", "Dockworkers' strike leaves containers stranded at port",
                 "Pension fund sells its stake in the tobacco firm", "Fashion label files for bankruptcy protection",
                 "Inflation eases to 3.1 per cent in March", "Hotel group bets on cheaper city breaks",
                 "Start-up raises 50 million in funding round", "Factory output falls for a sixth month",
                 "What a weaker currency means for holiday spending", "Landlords face higher costs as lending tightens",
                 "Toy maker blames shipping costs for profit warning", "Dairy farmers paid less for milk for the first time in years",
                 "Is the housing boom finally over?", "Online grocer doubles its delivery fleet",
                 "Watchdog opens inquiry into energy bills", "Employers add 180,000 jobs as wages rise",
                 "Luxury brand's sales slide in China", "Bakery chain to offer staff a four-day week",
                 "Gold hits a record as investors seek safety", "Crypto exchange halts withdrawals",
                 "Cinema operator sold to private equity"],
    "science": ["Can we really bring back the woolly mammoth?", "'The results surprised us,' say authors of sleep study",
                "Live: watch the rocket launch from the coast", "Five things we learned from the comet flyby",
                "Why bees are losing their sense of direction", "Telescope spots the most distant galaxy yet",
                "Volcanic eruption seen from orbit in stunning detail", "Brain implant lets paralysed man type by thought",
                "Quantum computer solves problem in four minutes", "New antibiotic found in soil bacteria",
                "Coral reefs recover faster than expected after bleaching", "Drones map a lost Maya city under the jungle",
                "What the solar eclipse can teach us about the sun", "Engineers test a plane that runs on hydrogen",
                "Smartphone app detects skin cancer from photos", "Dinosaur footprints uncovered on a beach after storm",
                "Is the ozone layer finally healing?", "Chemists turn plastic waste into fuel",
                "Earthquake early warning system passes first test", "Gravitational waves reveal a collision of black holes",
                "Octopuses seen dreaming in lab footage", "Open-source chip design runs on a laptop",
                "Wheat strain survives drought in field trials", "Microbes found thriving in Antarctic ice",
                "Light-powered motor is smaller than a cell"],
    "politics": ["Can the new coalition last until the summer?", "'This is a betrayal of voters,' says rebel MP",
                 "Live: results come in from the regional elections", "Five takeaways from last night's leaders' debate",
                 "Why the border deal collapsed at the last minute", "Mayor quits over planning scandal",
                 "Lawmakers pass bill to lower the voting age", "Minister sacked for breaking the code of conduct",
                 "Polls show tight race in the capital", "Ambassador expelled in diplomatic row",
                 "Protesters march against the new pension law", "Supreme court strikes down the emergency decree",
                 "What the new cabinet means for the climate pledge", "Party conference ends in a bitter row over leadership",
                 "Voters head to the polls in the run-off", "Peace talks resume after months of stalemate",
                 "Is the deputy leader preparing a challenge?", "Government U-turn on school meals",
                 "Senators demand an inquiry into lobbying", "Coalition partners split over the defence budget",
                 "Opposition wins the by-election with a large swing", "Chancellor sets out a spending freeze",
                 "Independence movement gathers signatures for a vote", "Cabinet minister apologises over leaked memo",
                 "Summit leaders agree a joint statement on refugees"],
}


def pool(seed: int = SEED) -> list[dict]:
    rows = []
    for topic in SUBJECTS:
        rng = random.Random(f"{seed}-{topic}")
        pairs = [(s, e) for s in SUBJECTS[topic] for e in EVENTS[topic]]
        rows += [{"text": f"{s} {e}", "category": topic, "answer": topic} for s, e in rng.sample(pairs, PER_TOPIC)]
    random.Random(seed).shuffle(rows)
    return rows


def heldout() -> list[dict]:
    rows = [{"text": t, "category": topic, "answer": topic} for topic, texts in HELDOUT.items() for t in texts]
    random.Random(SEED).shuffle(rows)
    return rows


def main() -> None:
    write_task("topic", pool(), heldout())


if __name__ == "__main__":
    main()
