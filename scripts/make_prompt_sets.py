"""Write the shipped prompt sets for synthetic teacher data (compression/data/prompts/), deterministically.

    python scripts/make_prompt_sets.py      # rewrites the three files; commit the result

- general.jsonl: ~200 varied general chat prompts (explanations, advice, stories, code, arithmetic, ...),
  written for this project.
- word_forms.train.jsonl / word_forms.heldout.jsonl: one narrow task family — the opposite of a word or
  the plural of a noun, in several phrasings — split 80/20 with the expected answer, from a seeded
  shuffle. Held-out prompts are never trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "compression" / "data" / "prompts"

TEMPLATES: list[tuple[str, list[str]]] = [
    ("Explain {} in simple terms.", [
        "photosynthesis", "how a refrigerator keeps food cold", "why the sky looks blue", "compound interest",
        "how vaccines train the immune system", "what a database index is", "the water cycle",
        "how a bicycle stays upright", "inflation", "how noise-cancelling headphones work", "plate tectonics",
        "what a recursive function is"]),
    ("Give me three tips for {}.", [
        "sleeping better", "learning a new language", "keeping houseplants alive", "writing a clear email",
        "saving money on groceries", "running a first 5k", "staying focused while studying",
        "giving a short speech", "cooking fluffy rice", "organising a small closet"]),
    ("Write a short poem about {}.", [
        "rain on a tin roof", "a lighthouse keeper", "the first snow of winter", "an old bicycle", "a city at dawn",
        "a cat watching birds", "autumn leaves", "a forgotten library book"]),
    ("Write a two-sentence story about {}.", [
        "a robot who learns to paint", "a lost key", "a dragon afraid of heights", "a train that never stops",
        "a message in a bottle", "a baker's secret ingredient", "a tiny door in a garden wall",
        "a time traveller's small mistake"]),
    ("What is the difference between {}?", [
        "weather and climate", "a virus and a bacterium", "RAM and disk storage", "a simile and a metaphor",
        "speed and velocity", "an alligator and a crocodile", "baking soda and baking powder", "a lake and a pond",
        "interest and dividends", "HTTP and HTTPS"]),
    ("Summarize in one sentence: {}", [
        "The town council met on Tuesday and voted to close the old bridge for repairs. Traffic will be sent "
        "through the east road for six weeks, and a free shuttle bus will run every twenty minutes.",
        "Mia planted tomatoes in April, but a late frost killed half of them. She replanted in May, covered the "
        "beds at night, and by August had more tomatoes than her family could eat.",
        "The new library opens at nine on weekdays and at ten on Saturdays. It has a children's corner, twelve "
        "study rooms that can be booked online, and a cafe on the ground floor.",
        "Researchers followed two hundred runners for a year. Those who slept at least seven hours had fewer "
        "injuries than those who slept less, even when training the same distance.",
        "Our team moved the weekly meeting from Monday to Wednesday because many people were travelling on "
        "Mondays. The agenda will be shared the day before, and notes will be posted afterwards.",
        "The recipe calls for flour, eggs, milk and a pinch of salt. Whisk everything until smooth, let the "
        "batter rest for ten minutes, and cook thin layers in a hot pan.",
        "After three years of planning, the village finally opened its community garden. Each family gets one "
        "small plot, and the harvest festival will be held there every September.",
        "The software update fixes a bug that drained the battery overnight. It also adds a dark mode and makes "
        "the search bar faster.",
        "A small bakery started delivering bread by bicycle. Orders doubled in two months, so the owner hired "
        "two more riders and extended delivery to the next neighbourhood.",
        "The museum will be closed in January while the roof is replaced. Online tours and school visits to the "
        "storage rooms will continue during the closure.",
        "Volunteers cleaned the river bank on Sunday and collected forty bags of rubbish, most of it plastic "
        "bottles. The council promised new bins near the footpath.",
        "The bus company changed its timetable to match the new train times, so passengers now wait at most five "
        "minutes when changing at the central station."]),
    ("Rewrite this sentence to sound more formal: {}", [
        "hey, can you send me that file asap?", "we messed up the order, sorry about that",
        "the meeting got pushed to next week", "i think your plan is kind of risky",
        "thanks a ton for helping out yesterday", "the printer is broken again, ugh",
        "can't make it today, something came up", "this report needs way more detail"]),
    ("Translate into French: {}", [
        "Good morning, how are you?", "Where is the train station?", "I would like a cup of coffee, please.",
        "The weather is nice today.", "My brother lives in a small town.", "We are going to the beach tomorrow."]),
    ("{}", [
        "A shop sells pencils at 3 for 1 dollar. How much do 12 pencils cost?",
        "Tom has 24 apples and gives a third of them to his sister. How many apples does he have left?",
        "A train travels 180 kilometres in 2 hours. What is its average speed?",
        "If a recipe needs 250 grams of flour for 10 cookies, how much flour is needed for 30 cookies?",
        "A rectangle is 7 metres long and 4 metres wide. What is its area?",
        "Sara saves 15 dollars every week. How many weeks does she need to save 120 dollars?",
        "A book has 320 pages. If Ali reads 40 pages a day, how many days will he need to finish it?",
        "The temperature was -3 degrees in the morning and rose by 11 degrees by noon. What was it at noon?",
        "A class of 28 students splits into groups of 4. How many groups are there?",
        "A jacket costs 80 dollars and is on sale for 25 percent off. What is the sale price?"]),
    ("Write a Python function that {}.", [
        "reverses a string", "checks whether a number is prime", "counts the vowels in a string",
        "returns the largest of three numbers", "removes duplicates from a list while keeping the order",
        "converts Celsius to Fahrenheit", "computes the factorial of n", "checks whether a word is a palindrome",
        "sums the digits of an integer", "returns the n-th Fibonacci number"]),
    ("List five {}.", [
        "fruits that are high in vitamin C", "countries in South America", "common kitchen herbs",
        "ways to reduce plastic waste at home", "board games for families", "instruments in an orchestra",
        "planets in our solar system", "things to pack for a beach trip", "renewable energy sources",
        "genres of fiction"]),
    ("Why do {}?", [
        "cats purr", "leaves change colour in autumn", "people yawn", "onions make us cry", "bread loaves go stale",
        "birds migrate", "people get hiccups", "stars twinkle", "metal objects feel colder than wooden ones",
        "dogs wag their tails"]),
    ("How do I {}?", [
        "boil an egg so the yolk stays soft", "fix a flat bicycle tyre", "make a simple monthly budget",
        "remove a coffee stain from a shirt", "write a haiku", "start a vegetable garden on a balcony",
        "back up the photos on my phone", "tie a bowline knot", "prepare for a job interview",
        "make cold brew coffee"]),
    ("Give a short definition of {}.", [
        "democracy", "entropy", "an algorithm", "biodiversity", "gravity", "a noun", "a budget deficit",
        "a peninsula", "a protein", "an ecosystem"]),
    ("Suggest a name for {}.", [
        "a bakery that only sells bread", "a pet goldfish", "a hiking club", "a podcast about history",
        "a small coffee shop by the sea", "a robot vacuum cleaner", "a neighbourhood book club",
        "a band that plays jazz"]),
    ("Write a polite reply to a friend who {}.", [
        "invited me to dinner on a night I am busy", "asked to borrow my car for the weekend",
        "sent me a birthday present", "asked for advice about moving to another city",
        "forgot about our meeting", "shared a photo of their new puppy"]),
    ("Is it true that {}? Answer briefly.", [
        "goldfish have a three-second memory", "lightning never strikes the same place twice",
        "humans use only ten percent of their brains", "bats are blind",
        "the Great Wall of China is visible from space with the naked eye", "cracking your knuckles causes arthritis",
        "bulls are angered by the colour red", "chameleons change colour mainly to hide",
        "sugar makes children hyperactive", "camels store water in their humps"]),
    ("Describe {} in three sentences.", [
        "a busy market on a Saturday morning", "a quiet forest in winter", "a thunderstorm at sea",
        "an ideal lazy weekend", "a vintage car", "a mountain village", "a crowded train station at rush hour",
        "a sunset over the desert"]),
    ("What are the pros and cons of {}?", [
        "working from home", "electric cars", "living in a big city", "online learning", "owning a dog",
        "renting instead of buying a home", "using social media every day", "a four-day work week"]),
    ("{}", [
        "What is 17 times 23?", "Convert 5 kilometres to miles.", "What day of the week comes after Thursday?",
        "Spell the word 'necessary' backwards.", "Sort these numbers from smallest to largest: 42, 7, 19, 3, 88.",
        "What is the capital of Canada?", "How many minutes are there in a day?",
        "Name three words that rhyme with 'light'.", "Finish the sentence: The best way to learn something new is",
        "Tell me a joke about computers.", "What could I cook for dinner with eggs, spinach and cheese?",
        "Write a haiku about morning coffee.", "Give me a fun fact about octopuses.",
        "What is the boiling point of water in Fahrenheit?", "Who wrote the play Romeo and Juliet?",
        "What is the largest ocean on Earth?", "How many legs does a spider have?",
        "Recommend a good habit to start this month.", "What is the square root of 144?",
        "Write a friendly one-line greeting for a new colleague.", "Which is heavier, a kilogram of feathers or a "
        "kilogram of steel?", "What are the three primary colours?"]),
]

# One narrow task family, "English word forms": the opposite of a word, or the plural of a noun. Chosen
# because the default teacher (SmolLM2-135M, F16, greedy) does it often enough to be worth imitating:
# the expected word is in its answer for 17 of the 40 held-out prompts, against 1 of 8 for date
# conversion to ISO 8601, which we tried first (2026-11-30). A distilled student is then measured on a
# task its teacher can partly do, including the prompts it gets wrong (the hard cases).
OPPOSITES = [
    ("hot", "cold"), ("happy", "sad"), ("fast", "slow"), ("open", "closed"), ("light", "dark"), ("early", "late"),
    ("big", "small"), ("tall", "short"), ("heavy", "light"), ("strong", "weak"), ("rich", "poor"),
    ("young", "old"), ("loud", "quiet"), ("hard", "soft"), ("wet", "dry"), ("clean", "dirty"), ("full", "empty"),
    ("high", "low"), ("deep", "shallow"), ("wide", "narrow"), ("thick", "thin"), ("brave", "cowardly"),
    ("cheap", "expensive"), ("easy", "difficult"), ("true", "false"), ("first", "last"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("friend", "enemy"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"), ("increase", "decrease"),
    ("begin", "end"), ("give", "take"), ("laugh", "cry"), ("love", "hate"), ("sharp", "blunt"),
    ("smooth", "rough"), ("sweet", "sour"), ("day", "night"), ("north", "south"), ("east", "west"),
    ("summer", "winter"), ("question", "answer"), ("success", "failure"), ("always", "never"), ("near", "far"),
    ("safe", "dangerous"), ("polite", "rude"), ("generous", "selfish"), ("ancient", "modern"), ("major", "minor"),
    ("maximum", "minimum"), ("positive", "negative"), ("entrance", "exit"), ("import", "export"),
    ("asleep", "awake"), ("visible", "invisible"), ("possible", "impossible"), ("honest", "dishonest"),
    ("patient", "impatient"), ("legal", "illegal"), ("correct", "incorrect"), ("agree", "disagree"),
    ("appear", "disappear"), ("borrow", "lend"), ("catch", "throw"), ("float", "sink"), ("freeze", "melt"),
    ("attack", "defend"), ("question", "answer"), ("noisy", "silent"), ("crowded", "empty"), ("calm", "angry"),
    ("tidy", "messy"), ("healthy", "sick"), ("awake", "asleep"), ("public", "private"), ("simple", "complex"),
    ("ordinary", "special"), ("natural", "artificial"), ("temporary", "permanent"), ("guilty", "innocent"),
    ("victory", "defeat"), ("import", "export"), ("interior", "exterior"), ("optimist", "pessimist"),
    ("arrival", "departure"), ("shout", "whisper"), ("mountain", "valley"), ("ceiling", "floor"),
    ("beginning", "ending"), ("fresh", "stale"), ("wild", "tame"), ("loose", "tight"), ("straight", "curved"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("box", "boxes"), ("city", "cities"), ("knife", "knives"),
    ("sheep", "sheep"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"), ("woman", "women"),
    ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("wolf", "wolves"), ("half", "halves"),
    ("life", "lives"), ("wife", "wives"), ("shelf", "shelves"), ("loaf", "loaves"), ("thief", "thieves"),
    ("baby", "babies"), ("party", "parties"), ("story", "stories"), ("lady", "ladies"), ("country", "countries"),
    ("berry", "berries"), ("key", "keys"), ("day", "days"), ("toy", "toys"), ("boy", "boys"), ("bus", "buses"),
    ("glass", "glasses"), ("dish", "dishes"), ("church", "churches"), ("watch", "watches"), ("fox", "foxes"),
    ("wish", "wishes"), ("class", "classes"), ("brush", "brushes"), ("match", "matches"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("echo", "echoes"), ("piano", "pianos"), ("photo", "photos"),
    ("radio", "radios"), ("zoo", "zoos"), ("cactus", "cacti"), ("fungus", "fungi"), ("crisis", "crises"),
    ("analysis", "analyses"), ("thesis", "theses"), ("phenomenon", "phenomena"), ("criterion", "criteria"),
    ("fish", "fish"), ("deer", "deer"), ("moose", "moose"), ("series", "series"), ("species", "species"),
    ("ox", "oxen"), ("louse", "lice"), ("die", "dice"), ("calf", "calves"), ("elf", "elves"), ("scarf", "scarves"),
    ("roof", "roofs"), ("chief", "chiefs"), ("belief", "beliefs"), ("cliff", "cliffs"), ("book", "books"),
    ("cat", "cats"), ("dog", "dogs"), ("tree", "trees"), ("car", "cars"), ("house", "houses"), ("chair", "chairs"),
    ("window", "windows"), ("apple", "apples"), ("garden", "gardens"), ("river", "rivers"), ("bird", "birds"),
    ("horse", "horses"), ("idea", "ideas"), ("song", "songs"), ("table", "tables"), ("teacher", "teachers"),
    ("flower", "flowers"), ("bottle", "bottles"), ("pencil", "pencils"), ("candle", "candles"),
    ("monkey", "monkeys"), ("valley", "valleys"), ("donkey", "donkeys"), ("fly", "flies"), ("spy", "spies"),
    ("penny", "pennies"), ("quiz", "quizzes"), ("index", "indices"), ("appendix", "appendices"),
]
OPPOSITE_FORMS = ["What is the opposite of the word '{}'? Answer with one word.", "Give the opposite of '{}'.",
                  "Name a word that means the opposite of '{}'.", "What is the antonym of '{}'?"]
PLURAL_FORMS = ["What is the plural of '{}'?", "Write the plural form of the noun '{}'.",
                "How do you say more than one '{}'?", "Give the plural of '{}'. Answer with one word."]


def word_form_prompts(seed: int = 2026) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    seen = set()
    for kind, pairs, forms in (("opposite", OPPOSITES, OPPOSITE_FORMS), ("plural", PLURALS, PLURAL_FORMS)):
        for word, answer in pairs:
            if (kind, word) in seen:
                continue
            seen.add((kind, word))
            rows.append({"prompt": rng.choice(forms).format(word), "answer": answer, "kind": kind})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    general = [{"id": f"general-{i:03d}", "prompt": template.format(x)}
               for i, (template, x) in enumerate((t, x) for t, xs in TEMPLATES for x in xs)]
    assert len({g["prompt"] for g in general}) == len(general)
    write_jsonl(OUT / "general.jsonl", general)
    task = [{"id": f"word-forms-{i:03d}", **p} for i, p in enumerate(word_form_prompts())]
    cut = len(task) * 4 // 5
    write_jsonl(OUT / "word_forms.train.jsonl", task[:cut])
    write_jsonl(OUT / "word_forms.heldout.jsonl", task[cut:])
    print(f"{len(general)} general, {cut} train + {len(task) - cut} held-out word-form prompts in {OUT}")


if __name__ == "__main__":
    main()
