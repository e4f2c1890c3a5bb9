"""Sentence banks for the synthetic cohort: a few everyday topics per language.

A coherent session draws every sentence from one topic; worsening makes sentences drift to
other topics (derailment / tangentiality), the language marker the literature reports
(Elvevåg et al. 2007, Bedi et al. 2015). Sentences are short and plain so that espeak-ng
reads them naturally.
"""

from __future__ import annotations

TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "weekend": (
            "On Saturday I went for a long walk by the river.",
            "The weather was cold but the sun came out in the afternoon.",
            "My sister came over and we made soup together.",
            "In the evening we watched a film about a family on a farm.",
            "On Sunday I slept late and then cleaned the kitchen.",
            "I called my friend and we talked about the coming week.",
            "It was a quiet weekend and I felt rested afterwards.",
        ),
        "work": (
            "This week at work we had a lot of meetings.",
            "My manager asked me to finish the report by Friday.",
            "I had lunch with two colleagues in the canteen.",
            "The new computer system is slow but it is getting better.",
            "I took the bus home because the car was at the garage.",
            "Next month we will move to a different office floor.",
            "Most days I start at eight and finish at four.",
        ),
        "food": (
            "I like to cook pasta with tomatoes and fresh basil.",
            "Yesterday I bought bread, cheese and apples at the market.",
            "My favourite meal is fish with potatoes and carrots.",
            "I try to eat breakfast before I leave the house.",
            "On Fridays we usually order pizza for the whole family.",
            "I have started drinking less coffee in the evening.",
            "My grandmother taught me how to bake a simple cake.",
        ),
        "travel": (
            "Last summer we took the train to the mountains.",
            "The hotel was small but the view from the window was lovely.",
            "We walked up to a lake and had a picnic by the water.",
            "On the way back the train was delayed for an hour.",
            "I would like to visit the coast again next year.",
            "Packing always takes me longer than I expect.",
            "The best part of the trip was the fresh air.",
        ),
        "health": (
            "I have been sleeping about seven hours a night.",
            "My doctor said I should keep walking every day.",
            "I take my medicine in the morning with breakfast.",
            "Some days I feel tired after lunch.",
            "I have been trying to drink more water.",
            "The exercise class on Tuesdays helps me a lot.",
            "I feel calmer when I keep a regular routine.",
        ),
        "garden": (
            "The roses in the garden are starting to bloom.",
            "I planted potatoes and onions in the spring.",
            "Birds come every morning to eat from the feeder.",
            "We had to cut the hedge because it grew too tall.",
            "Watering the plants in the evening is relaxing.",
            "The neighbour gave us some strawberry plants.",
            "Autumn leaves cover the lawn by October.",
        ),
    },
    "nb": {
        "helg": (
            "På lørdag gikk jeg en lang tur langs elva.",
            "Det var kaldt, men sola kom fram om ettermiddagen.",
            "Søsteren min kom på besøk og vi lagde suppe sammen.",
            "Om kvelden så vi en film om en familie på en gård.",
            "På søndag sov jeg lenge og vasket kjøkkenet.",
            "Jeg ringte en venn og vi snakket om uka som kommer.",
            "Det var en rolig helg og jeg følte meg uthvilt etterpå.",
        ),
        "jobb": (
            "Denne uka hadde vi mange møter på jobben.",
            "Sjefen ba meg gjøre ferdig rapporten til fredag.",
            "Jeg spiste lunsj med to kolleger i kantina.",
            "Det nye datasystemet er tregt, men det blir bedre.",
            "Jeg tok bussen hjem fordi bilen var på verkstedet.",
            "Neste måned flytter vi til en annen etasje.",
            "De fleste dager begynner jeg klokka åtte og slutter klokka fire.",
        ),
        "mat": (
            "Jeg liker å lage pasta med tomater og frisk basilikum.",
            "I går kjøpte jeg brød, ost og epler på torget.",
            "Favorittmaten min er fisk med poteter og gulrøtter.",
            "Jeg prøver å spise frokost før jeg går hjemmefra.",
            "På fredager bestiller vi ofte pizza til hele familien.",
            "Jeg har begynt å drikke mindre kaffe om kvelden.",
            "Bestemor lærte meg å bake en enkel kake.",
        ),
        "reise": (
            "I fjor sommer tok vi toget til fjellet.",
            "Hotellet var lite, men utsikten fra vinduet var fin.",
            "Vi gikk opp til et vann og hadde piknik ved vannkanten.",
            "På vei hjem var toget forsinket i en time.",
            "Jeg vil gjerne besøke kysten igjen neste år.",
            "Det tar alltid lengre tid å pakke enn jeg tror.",
            "Det beste med turen var den friske lufta.",
        ),
        "helse": (
            "Jeg har sovet omtrent sju timer hver natt.",
            "Legen sa at jeg burde fortsette å gå tur hver dag.",
            "Jeg tar medisinen om morgenen sammen med frokosten.",
            "Noen dager er jeg trøtt etter lunsj.",
            "Jeg har prøvd å drikke mer vann.",
            "Treningen på tirsdager hjelper meg mye.",
            "Jeg føler meg roligere når jeg har faste rutiner.",
        ),
        "hage": (
            "Rosene i hagen har begynt å blomstre.",
            "Jeg satte poteter og løk i vår.",
            "Fuglene kommer hver morgen for å spise fra fôrbrettet.",
            "Vi måtte klippe hekken fordi den ble for høy.",
            "Det er avslappende å vanne plantene om kvelden.",
            "Naboen ga oss noen jordbærplanter.",
            "Høstløvet dekker plenen i oktober.",
        ),
    },
}


def topics(language: str) -> dict[str, tuple[str, ...]]:
    """The topic bank for a BCP-47 language tag (``en``, ``nb``)."""
    try:
        return TOPICS[language]
    except KeyError:
        raise ValueError(
            f"No sentence bank for language {language!r}; available: {', '.join(sorted(TOPICS))}."
        ) from None
