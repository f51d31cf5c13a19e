"""Write the labelled data of specs/bench/language.yaml: which language a short text is written in.

    .venv/bin/python specs/bench/make_language_data.py     # rewrites specs/bench/data/*.jsonl

Deterministic (seeded), from the phrase lists below, all written for this benchmark:

- data/language.jsonl, the training pool: per language (English, French, Spanish, German)
  16 single everyday clauses, 36 pairs of clauses joined by that language's "but", "and" or
  "Oh, and", 8 very short replies ("Me too.", "Ni idea.") and 10 hard cases that name people, places,
  brands or loanwords of another language ("Das Meeting ist um zehn.", "We had coffee at Café de
  Flore"): 70 rows per language, 280 in all.
- data/language_heldout.jsonl, the held-out eval source: 16 per language, worded differently
  from anything in the pool (questions and informal chat messages, lower case, no final stop,
  abbreviations), 64 in all.

Each row: {"text", "category" (the language: the coverage bucket), "answer" (the gold label)}.
"""

from __future__ import annotations

import random

from task_data import write_task

SEED = 7

CLAUSES = {
    "english": [
        "the train was twenty minutes late this morning", "my sister found a new job in the city",
        "we spent the whole afternoon in the garden", "the bakery on the corner closed last month",
        "I still have to finish the report for tomorrow", "the children would not stop laughing at dinner",
        "our neighbours are painting their house blue", "it rained for three days without a break",
        "the new phone takes much better pictures", "I forgot to buy bread on the way home",
        "the meeting lasted almost two hours", "my grandfather grows tomatoes on his balcony",
        "the museum was full of school groups", "we finally booked the flights for August",
        "the soup needed a little more salt", "nobody answered the phone at the office",
        "the dog slept on the sofa all evening", "I started running twice a week",
        "the library has moved to a bigger building", "the bus driver wished everyone a good day",
        "my parents are coming to visit next weekend", "the printer ran out of ink again",
        "we watched an old film on television", "the shop gave me a discount because the box was damaged",
        "the pub quiz on Thursday was harder than usual", "I spilled coffee all over my notes",
        "the lawn needs mowing before the rain comes", "the plumber says he can come on Monday",
        "my cousin moved to a flat near the river", "the queue at the post office went round the block",
    ],
    "french": [
        "le train avait vingt minutes de retard ce matin", "ma sœur a trouvé un nouveau travail en ville",
        "nous avons passé tout l'après-midi au jardin", "la boulangerie du coin a fermé le mois dernier",
        "je dois encore finir le rapport pour demain", "les enfants n'arrêtaient pas de rire pendant le dîner",
        "nos voisins repeignent leur maison en bleu", "il a plu trois jours sans s'arrêter",
        "le nouveau téléphone prend de bien meilleures photos", "j'ai oublié d'acheter du pain en rentrant",
        "la réunion a duré presque deux heures", "mon grand-père cultive des tomates sur son balcon",
        "le musée était plein de groupes scolaires", "nous avons enfin réservé les billets d'avion pour août",
        "la soupe manquait un peu de sel", "personne ne répondait au téléphone au bureau",
        "le chien a dormi sur le canapé toute la soirée", "je me suis mis à courir deux fois par semaine",
        "la bibliothèque a déménagé dans un bâtiment plus grand",
        "le chauffeur du bus a souhaité une bonne journée à tout le monde",
        "mes parents viennent nous voir le week-end prochain", "l'imprimante n'a plus d'encre, encore une fois",
        "nous avons regardé un vieux film à la télévision",
        "le magasin m'a fait une réduction parce que la boîte était abîmée",
        "on a pique-niqué au bord du canal", "le marché du samedi était bondé",
        "mon colocataire a encore laissé la vaisselle dans l'évier", "la grève des transports a duré toute la semaine",
        "j'ai enfin rangé la cave", "le fromager m'a conseillé un comté de dix-huit mois",
    ],
    "spanish": [
        "el tren llegó con veinte minutos de retraso esta mañana", "mi hermana encontró un trabajo nuevo en la ciudad",
        "pasamos toda la tarde en el jardín", "la panadería de la esquina cerró el mes pasado",
        "todavía tengo que terminar el informe para mañana", "los niños no paraban de reírse durante la cena",
        "nuestros vecinos están pintando su casa de azul", "llovió tres días sin parar",
        "el móvil nuevo saca fotos mucho mejores", "se me olvidó comprar pan de camino a casa",
        "la reunión duró casi dos horas", "mi abuelo cultiva tomates en el balcón",
        "el museo estaba lleno de grupos de colegios", "por fin reservamos los vuelos para agosto",
        "a la sopa le faltaba un poco de sal", "nadie contestaba el teléfono en la oficina",
        "el perro durmió en el sofá toda la tarde", "empecé a correr dos veces por semana",
        "la biblioteca se ha mudado a un edificio más grande", "el conductor del autobús nos deseó un buen día a todos",
        "mis padres vienen a visitarnos el fin de semana que viene", "la impresora se ha quedado sin tinta otra vez",
        "vimos una película antigua en la tele",
        "en la tienda me hicieron un descuento porque la caja estaba dañada",
        "la siesta de hoy me ha sentado genial", "cenamos tapas en un bar del centro",
        "mi primo se ha comprado una moto", "el vecino de arriba hace obras todos los días",
        "hacía un calor horrible en el metro", "la frutería de mi barrio tiene unas naranjas buenísimas",
    ],
    "german": [
        "der Zug hatte heute Morgen zwanzig Minuten Verspätung", "meine Schwester hat eine neue Stelle in der Stadt gefunden",
        "wir haben den ganzen Nachmittag im Garten verbracht", "die Bäckerei an der Ecke hat letzten Monat zugemacht",
        "ich muss den Bericht für morgen noch fertig schreiben", "die Kinder haben beim Abendessen ständig gelacht",
        "unsere Nachbarn streichen ihr Haus blau an", "es hat drei Tage ohne Pause geregnet",
        "das neue Handy macht viel bessere Fotos", "ich habe vergessen, auf dem Heimweg Brot zu kaufen",
        "die Besprechung hat fast zwei Stunden gedauert", "mein Großvater zieht Tomaten auf seinem Balkon",
        "das Museum war voller Schulklassen", "wir haben endlich die Flüge für August gebucht",
        "in der Suppe fehlte ein bisschen Salz", "im Büro ist niemand ans Telefon gegangen",
        "der Hund hat den ganzen Abend auf dem Sofa geschlafen", "ich gehe jetzt zweimal pro Woche laufen",
        "die Bibliothek ist in ein größeres Gebäude umgezogen", "der Busfahrer hat allen einen schönen Tag gewünscht",
        "meine Eltern kommen uns nächstes Wochenende besuchen", "der Drucker hat schon wieder keine Tinte mehr",
        "wir haben im Fernsehen einen alten Film angeschaut",
        "der Laden hat mir Rabatt gegeben, weil die Packung beschädigt war",
        "der Kuchen von meiner Oma war wie immer lecker", "wir sind am Sonntag mit dem Rad an den See gefahren",
        "die Heizung in der Wohnung ist kaputt", "mein Mitbewohner hat schon wieder den Müll vergessen",
        "auf der Autobahn gab es einen langen Stau", "der Weihnachtsmarkt macht erst nächste Woche auf",
    ],
}
# Joiners after which a main clause keeps its word order (no German inversion), no causal link implied.
JOINERS = {
    "english": [", but ", " and ", ". Oh, and "],
    "french": [", mais ", " et ", ". Ah, et "],
    "spanish": [", pero ", " y ", ". Ah, y "],
    "german": [", aber ", " und ", ". Ach ja, "],
}
ENDINGS = [".", ".", ".", "!", ""]  # mostly a full stop; sometimes none, as people type
ENDINGS_ES = [".", ".", ".", ""]  # a Spanish "!" needs its opening "¡"
ENDINGS_FR = [".", ".", ".", " !", ""]  # French sets "!" off with a space
SHORT = {
    "english": ["Thanks a lot!", "See you later.", "No idea.", "Sounds good to me.", "Happy birthday!",
                "Why not?", "Good night, everyone.", "Me too."],
    "french": ["Merci beaucoup !", "À plus tard.", "Aucune idée.", "Ça me va.", "Bon anniversaire !",
               "Pourquoi pas ?", "Bonne nuit à tous.", "Moi aussi."],
    "spanish": ["¡Muchas gracias!", "Hasta luego.", "Ni idea.", "Me parece bien.", "¡Feliz cumpleaños!",
                "¿Por qué no?", "Buenas noches a todos.", "Yo también."],
    "german": ["Vielen Dank!", "Bis später.", "Keine Ahnung.", "Passt mir gut.", "Alles Gute zum Geburtstag!",
               "Warum nicht?", "Gute Nacht zusammen.", "Ich auch."],
}
# Hard cases: names, places, brands and loanwords from another language.
FOREIGN_WORDS = {
    "english": ["We had coffee at Café de Flore before the flight to Paris.",
                "My colleague Jürgen brought sauerkraut to the office party.",
                "The tapas bar on Main Street serves great paella.", "She said bonjour to everyone in the lift.",
                "I ordered a croissant and a latte to go.", "The Volkswagen broke down just outside Madrid.",
                "Our guide, Señor García, knew every church in Seville.", "The kindergarten closes early on Fridays.",
                "He studied in Munich for a year.", "Let's meet at the Plaza Mayor at noon."],
    "french": ["On a pris un brunch au Starbucks de la gare.", "Mon chef veut faire un meeting à neuf heures.",
               "J'ai acheté une Kindle sur Amazon.", "Le week-end, je fais du jogging au parc.",
               "Nous avons mangé des tapas à Barcelone.", "Mon collègue Hans adore le football américain.",
               "Elle a fait du shopping à New York.", "Le parking du supermarché est complet.",
               "Le pâtissier a servi un strudel aux pommes.", "On se retrouve au pub irlandais après le match."],
    "spanish": ["Quedamos en el Starbucks de la Gran Vía.", "Mi jefe quiere una reunión por Zoom a las nueve.",
                "Compré unas zapatillas Nike en el outlet.", "Este finde hice footing en el parque.",
                "Mi amiga Claire vive en un pueblo cerca de Lyon.", "El chef preparó un croissant relleno de jamón.",
                "Vimos el partido en un pub irlandés.", "Me mandó un email con el link del vídeo.",
                "Mi hermano trabaja para una empresa de Berlín.", "El parking del hotel estaba lleno."],
    "german": ["Wir treffen uns um acht im Starbucks am Bahnhof.", "Das Meeting mit dem Team ist um zehn.",
               "Ich habe mir online ein neues Smartphone bestellt.", "Am Wochenende gehe ich im Park joggen.",
               "Meine Freundin Marie wohnt jetzt in Paris.", "Wir haben in Barcelona Paella gegessen.",
               "Der Bäcker hat das Baguette selbst gemacht.", "Nach dem Spiel gingen wir in einen Irish Pub.",
               "Er hat mir den Link per E-Mail geschickt.", "Der Parkplatz vor dem Hotel war voll."],
}
# Held-out wording: questions and chat messages, nothing like the pool's statements.
HELDOUT = {
    "english": ["hey, are you coming to the barbecue on saturday?", "Could you send me the address of the restaurant?",
                "What time does the pharmacy close tonight?", "lol I just saw your message, sorry!",
                "Do we need to bring anything for the picnic?", "Has anyone seen my umbrella?",
                "just landed, will call you from the taxi", "Which platform does the train to Leeds leave from?",
                "ok see u at 7 at the cinema", "Is the swimming pool open on public holidays?",
                "can't find my charger anywhere, did I leave it at yours?", "How much is a ticket for the concert?",
                "running late, start without me", "Would you mind feeding the cat while I'm away?",
                "did you remember to book the table?", "Where did you put the spare keys?"],
    "french": ["salut, tu viens au barbecue samedi ?", "Tu peux m'envoyer l'adresse du restaurant ?",
               "À quelle heure ferme la pharmacie ce soir ?", "mdr je viens de voir ton message, désolé !",
               "Il faut apporter quelque chose pour le pique-nique ?", "Quelqu'un a vu mon parapluie ?",
               "je viens d'atterrir, je t'appelle du taxi", "De quel quai part le train pour Lyon ?",
               "ok on se voit à 19h au ciné", "La piscine est-elle ouverte les jours fériés ?",
               "je trouve plus mon chargeur, je l'ai laissé chez toi ?", "Combien coûte une place pour le concert ?",
               "je suis en retard, commencez sans moi", "Ça te dérange de nourrir le chat pendant mon absence ?",
               "t'as pensé à réserver la table ?", "Où as-tu mis le double des clés ?"],
    "spanish": ["oye, ¿vienes a la barbacoa el sábado?", "¿Me mandas la dirección del restaurante?",
                "¿A qué hora cierra la farmacia esta noche?", "jaja acabo de ver tu mensaje, ¡perdona!",
                "¿Hay que llevar algo para el picnic?", "¿Alguien ha visto mi paraguas?",
                "acabo de aterrizar, te llamo desde el taxi", "¿De qué andén sale el tren para Valencia?",
                "vale, nos vemos a las 7 en el cine", "¿La piscina abre los días festivos?",
                "no encuentro el cargador, ¿me lo dejé en tu casa?", "¿Cuánto cuesta una entrada para el concierto?",
                "llego tarde, empezad sin mí", "¿Te importa dar de comer al gato mientras estoy fuera?",
                "¿te acordaste de reservar la mesa?", "¿Dónde has puesto las llaves de repuesto?"],
    "german": ["hey, kommst du am Samstag zum Grillen?", "Kannst du mir die Adresse vom Restaurant schicken?",
               "Wann macht die Apotheke heute Abend zu?", "haha hab deine Nachricht gerade erst gesehen, sorry!",
               "Müssen wir was zum Picknick mitbringen?", "Hat jemand meinen Regenschirm gesehen?",
               "bin gerade gelandet, ruf dich aus dem Taxi an", "Von welchem Gleis fährt der Zug nach Köln?",
               "ok, dann um 7 am Kino", "Hat das Schwimmbad an Feiertagen offen?",
               "finde mein Ladekabel nicht, hab ich es bei dir liegen lassen?", "Was kostet eine Karte für das Konzert?",
               "bin spät dran, fangt ohne mich an", "Könntest du die Katze füttern, während ich weg bin?",
               "hast du daran gedacht, den Tisch zu reservieren?", "Wo hast du die Ersatzschlüssel hingelegt?"],
}
SINGLES, PAIRS = 16, 36


def _sentence(text: str, ending: str) -> str:
    return text[0].upper() + text[1:] + ending


def pool(seed: int = SEED) -> list[dict]:
    rows = []
    for language, clauses in CLAUSES.items():
        rng = random.Random(f"{seed}-{language}")
        endings = {"spanish": ENDINGS_ES, "french": ENDINGS_FR}.get(language, ENDINGS)
        texts = [_sentence(clause, rng.choice(endings)) for clause in rng.sample(clauses, SINGLES)]
        pairs = [(a, b) for a in range(len(clauses)) for b in range(len(clauses)) if a != b]
        texts += [_sentence(clauses[a] + rng.choice(JOINERS[language]) + clauses[b], rng.choice(endings))
                  for a, b in rng.sample(pairs, PAIRS)]
        texts += SHORT[language] + FOREIGN_WORDS[language]
        rows += [{"text": t, "category": language, "answer": language} for t in texts]
    random.Random(seed).shuffle(rows)
    return rows


def heldout() -> list[dict]:
    rows = [{"text": t, "category": language, "answer": language} for language, texts in HELDOUT.items() for t in texts]
    random.Random(SEED).shuffle(rows)
    return rows


def main() -> None:
    write_task("language", pool(), heldout())


if __name__ == "__main__":
    main()
