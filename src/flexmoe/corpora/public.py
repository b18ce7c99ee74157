"""General English prose, generated procedurally: the largest source of the public pools.

Two kinds of documents, in the spirit of TinyStories and of a children's encyclopedia:

- stories: a character, a friend and a family member in a setting, one of several plots (a lost
  treasure, a fear overcome, a quarrel mended, a journey, ...) told with dialogue and cause and effect;
- expository texts: animals, tools, weather, jobs and plants from small hand-written fact tables, and
  invented towns with history-like chronicles.

Every sentence comes from a hand-written template whose slots are filled from word tables, so the
text stays grammatical. This generator writes no program code, worked arithmetic or legal language;
the public pools get those kinds of text from other sources (``flexmoe.corpora.federations``).
"""

from __future__ import annotations

from collections.abc import Iterator

from flexmoe.corpora._rand import Rand, until_budget


def _words(text: str) -> tuple[str, ...]:
    """A table written as ``|``-separated items (items may contain spaces)."""
    return tuple(w.strip() for w in text.split("|") if w.strip())


def _a(phrase: str) -> str:
    """The phrase with the right indefinite article ("a kite", "an owl", "a unicorn")."""
    first = phrase.split()[0].lower()
    vowel = first[0] in "aeiou" and not first.startswith(("uni", "use", "eu", "one"))
    return ("an " if vowel or first in {"hour", "honest"} else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ---------------------------------------------------------------------------------------------------
# Word tables for stories
# ---------------------------------------------------------------------------------------------------

GIRL_NAMES = _words(
    "Lily|Mia|Sara|Anna|Lucy|Emma|Zoe|Ella|Rosa|Nora|Maya|Ruby|Ivy|Hannah|Clara|Alice|Grace|Daisy|"
    "Poppy|Hazel|Iris|Julia|Kira|Leah|Molly|Nina|Olive|Pia|Quinn|Rita|Stella|Tara|Uma|Vera|Willa|Yara|"
    "Amira|Bea|Cora|Dora|Eva|Fiona|Gemma|Hope|Isla|Jade|Kate|Luna|Mei|Nadia|Opal|Penny|Rhea|Sofia|"
    "Tilly|Una|Violet|Wren|Zara|Aiko|Esme|Freya|Greta|Holly|Ines|June|Lena|Maisie|Nell|Pearl|Sage|Thea"
)
BOY_NAMES = _words(
    "Tom|Ben|Max|Leo|Sam|Jack|Finn|Noah|Theo|Oscar|Hugo|Eli|Jonah|Kai|Liam|Milo|Ned|Otto|Pete|Ravi|"
    "Sid|Toby|Umar|Vic|Will|Zane|Adam|Bram|Cody|Dan|Ezra|Felix|Gus|Harry|Ian|Jude|Kofi|Luca|Marco|Nico|"
    "Omar|Paul|Rory|Seth|Tariq|Ugo|Vince|Wes|Yusuf|Alfie|Arlo|Basil|Caleb|Dev|Emil|Frank|George|Henry|"
    "Isaac|Joel|Kenji|Louis|Mateo|Nate|Ollie|Percy|Rafi|Stan|Teddy|Ari|Bo|Cal"
)
CHILD_KINDS = {"she": _words("girl"), "he": _words("boy")}
ANIMAL_KINDS = _words(
    "rabbit|fox|bear|mouse|owl|duck|squirrel|hedgehog|cat|dog|puppy|kitten|frog|turtle|deer|badger|otter|"
    "beaver|raccoon|lamb|pig|goat|pony|hen|goose|robin|sparrow|penguin|seal|dolphin|elephant|giraffe|"
    "lion|tiger|zebra|monkey|koala|panda|kangaroo|camel|bee|ladybug|butterfly|snail|lizard|dragon|"
    "mole|chipmunk|crab|whale|bat|swan|parrot|donkey|moose|wolf|hamster|crow"
)
SIZE_WORDS = _words("little|young|small|tiny|big|fluffy|tall|clumsy|fast|old")
TRAITS = _words(
    "kind|curious|shy|brave|clever|cheerful|gentle|playful|careful|busy|friendly|quiet|noisy|sleepy|"
    "grumpy|helpful|honest|silly|proud|patient|thoughtful|bold|dreamy|cheeky|lively|polite|generous|"
    "hungry|bouncy|chatty|nervous|stubborn|bright|funny|eager|calm|messy|tidy|hardworking|adventurous|"
    "cautious|daring|forgetful|gentle|imaginative|jolly|loyal|mischievous|modest|sensible|spirited|"
    "talkative|timid|wise|witty|dreamy|restless|sunny|fearless"
)
ELDERS = _words("mom|dad|grandma|grandpa|aunt|uncle|big sister|big brother|mother|father|granny|nana")
ELDER_PRONOUN = {
    "mom": "she",
    "mother": "she",
    "grandma": "she",
    "aunt": "she",
    "big sister": "she",
    "granny": "she",
    "nana": "she",
    "dad": "he",
    "father": "he",
    "grandpa": "he",
    "uncle": "he",
    "big brother": "he",
}
HOMES = _words(
    "in a small village by the sea|in a busy town with a red bridge|at the edge of a deep forest|"
    "on a farm with a big red barn|in a tall building in the middle of the city|"
    "in a cozy burrow under an old oak tree|near a quiet lake in the mountains|"
    "on a little island with a white lighthouse|in a yellow house at the end of a long lane|"
    "in a cottage with a garden full of roses|beside a river that sparkled in the sun|"
    "in a snowy valley between two hills|in a windmill on top of a green hill|"
    "in a wooden cabin among the pine trees|in a narrow street full of little shops|"
    "in a warm nest high in a chestnut tree|in a round house with a blue door|"
    "near a sandy beach where the waves were gentle|in a quiet town where everyone knew each other|"
    "at the bottom of a hill covered in daisies|in a houseboat on a slow canal"
)
OUTDOORS = _words(
    "the park|the garden|the meadow|the beach|the river bank|the forest path|the market|the playground|"
    "the hill behind the school|the pond|the orchard|the field of sunflowers|the old bridge|the harbor|"
    "the top of the hill|the edge of the woods|the village square|the sandy shore|the berry bushes|"
    "the little stream|the farmyard|the zoo|the school yard|the lake|the camping ground"
)
HIDES = _words(
    "under the bed|behind the sofa|in the toy box|inside a boot|on the top shelf|under a pile of leaves|"
    "in the laundry basket|behind the curtains|in the kitchen drawer|under the stairs|"
    "in the garden shed|next to the flower pots|inside the old teapot|behind the bookcase|"
    "under a big cushion|in the pocket of a coat|beside the front door|in the bathtub|"
    "under the kitchen table|on the windowsill|in a basket of apples|behind the wood pile|"
    "inside a rain boot|under the doormat|in the dog's bed|at the bottom of the wardrobe"
)
OBJECTS = _words(
    "kite|ball|teddy bear|doll|toy car|toy train|puzzle|storybook|drawing|box of crayons|marble|hat|"
    "scarf|balloon|shell|music box|wooden boat|spinning top|yo-yo|whistle|umbrella|lantern|sketchbook|"
    "backpack|necklace|bracelet|key|map|compass|telescope|jump rope|paper crown|feather|pebble|acorn|"
    "blanket|pair of mittens|bell|flute|drum|robot|picture book|paintbrush|pinwheel|snow globe|"
    "wooden horse|toy rocket|glass jar|basket|scooter|sled|fishing net|bucket|notebook|bow|"
    "harmonica|kaleidoscope|magnet|pocket watch|butterfly net|rag doll|tin soldier|pencil case|"
    "wooden sword|xylophone|rocking horse|jigsaw puzzle|toy sailboat|silver coin|ribbon|lunch box"
)
COLORS = _words(
    "red|blue|green|yellow|purple|orange|pink|brown|gray|white|silver|golden|striped|spotted|shiny|"
    "bright red|pale blue|dark green|sunny yellow|sky blue|rainbow"
)
FOODS = _words(
    "apples|bread|soup|cookies|cheese|honey|berries|carrots|pancakes|apple pie|sandwiches|muffins|"
    "warm milk|lemonade|strawberries|porridge|corn|pears|plums|nuts|rice|noodles|toast with jam|"
    "blueberry cake|cherries|peas|potatoes|oranges|grapes|biscuits|cinnamon rolls|pumpkin soup|"
    "vegetable stew|scrambled eggs|gingerbread|hot chocolate|baked apples|carrot cake|fish pie|"
    "oatcakes|lentil soup|roasted chestnuts|cheese sandwiches|plum jam|rice pudding|fruit salad"
)
HOBBIES = _words(
    "draw pictures|sing songs|climb trees|read books|build sandcastles|collect shells|play the drum|"
    "dance in the rain|count the stars|bake cookies|fly a kite|splash in puddles|pick flowers|"
    "make paper boats|watch the clouds|ride a bike|play hide and seek|tell jokes|paint with bright colors|"
    "look for bugs|grow vegetables|play the flute|skip stones on the water|build towers of blocks|"
    "make up stories|swing as high as possible|run races|jump rope|feed the ducks|explore the woods|"
    "visit the library|play in the snow|help in the kitchen|watch the boats|learn new words|"
    "knit scarves|whistle tunes|press flowers|sail toy boats|do cartwheels|solve riddles|"
    "carve little animals from wood|write poems|listen to the rain|draw maps of secret islands"
)
GOOD = _words(
    "happy|glad|proud|excited|calm|warm inside|safe|thankful|joyful|cheerful|brave|hopeful|peaceful|"
    "delighted|relieved|lucky|loved"
)
BAD = _words(
    "sad|worried|scared|upset|lonely|cross|nervous|disappointed|confused|grumpy|tired|jealous|unhappy|"
    "frightened|gloomy|shy"
)
SAY = _words("said|asked|called|whispered|replied|answered|shouted|laughed|sighed|giggled|cried")
SEASONS = {
    "spring": _words(
        "the flowers were opening in the warm sun|soft rain was falling on the new leaves|"
        "the birds were building nests in the hedges|the grass was fresh and green|"
        "a gentle breeze carried the smell of blossoms"
    ),
    "summer": _words(
        "the sun was hot and the sky was blue|the bees were buzzing over the clover|"
        "the air was warm and still|the days were long and bright|"
        "the cherries were ripe on the trees"
    ),
    "autumn": _words(
        "the leaves were turning red and gold|a cool wind was blowing the leaves around|"
        "the mornings were foggy and quiet|the apples were ready to pick|"
        "the geese were flying south in long lines"
    ),
    "winter": _words(
        "snow had covered everything in white|the pond was frozen solid|"
        "the wind was cold and sharp|the windows were covered in frost|"
        "the sky was gray and full of snow"
    ),
}
WHENS = _words(
    "One morning|One afternoon|One day|Early one morning|Late one afternoon|On a bright Saturday|"
    "One evening|The next morning|On the first day of the holidays|One quiet Sunday|After breakfast one day"
)
CREATURES = _words(
    "a little bird|a squirrel|a sleepy cat|a busy mouse|a friendly dog|a tiny frog|a curious crow|"
    "a fat hedgehog|a young deer|a shy rabbit|a hungry goat|a noisy duck|a wise old owl|a lost puppy"
)


# ---------------------------------------------------------------------------------------------------
# Story templates. A plot is a list of paragraphs; a paragraph is a list of stages; each stage is a
# tuple of alternative sentences (an empty alternative makes the stage optional).
# ---------------------------------------------------------------------------------------------------

OPENING = [
    (
        "Once upon a time, there was {a_trait_kind} named {Name}.",
        "There once was {a_trait_kind} called {Name}.",
        "In a land far away, there lived {a_trait_kind} named {Name}.",
        "Not long ago, {home}, there lived {a_trait_kind} named {Name}.",
        "{Name} was {a_trait_kind}.",
        "This is a story about {a_trait_kind} named {Name}.",
    ),
    (
        "{He} lived {home} with {his} {elder}.",
        "{His} home was {home}.",
        "{Name} and {his} {elder} lived {home}.",
        "Every day, {Name} woke up {home} and looked out of the window.",
    ),
    (
        "{Name} loved to {hobby}.",
        "More than anything, {he} liked to {hobby}.",
        "{His} favorite thing to do was to {hobby}.",
        "When {he} was not busy, {Name} liked to {hobby} and {hobby2}.",
        "{He} could {hobby} all day long and never get bored.",
        "",
    ),
    (
        "{His} best friend was {fName}, {a_ftrait_fkind}.",
        "{Name} had a good friend named {fName}, who was {a_ftrait_fkind}.",
        "{Name} often played with {fName}, {a_ftrait_fkind} who lived nearby.",
        "Next door lived {fName}, {a_ftrait_fkind}, and the two of them did everything together.",
    ),
]

EVENT_START = (
    "{When} in {season}, {weather}.",
    "{When}, {weather}.",
    "It was {season}, and {weather}.",
    "{When}, {Name} went out to {where}. It was {season}, and {weather}.",
)

ENDINGS = [
    (
        "{Name} learned that {moral}.",
        "That day, {Name} learned that {moral}.",
        '"I think {moral}," {Name} said to {his} {elder} that evening. {His} {elder} smiled and nodded.',
        "It was a good lesson: {moral}.",
    ),
    (
        "That night, {Name} fell asleep with a big smile on {his} face.",
        "When the sun went down, {Name} went home feeling {good}.",
        "It had been a long day, but it was also one of the best.",
        "And from then on, {Name} and {fName} were the best of friends.",
        "{Name} never forgot that day.",
        "After that, whenever {he} saw {where}, {Name} remembered what had happened and smiled.",
        "",
    ),
]

PLOTS: dict[str, tuple[list[list[tuple[str, ...]]], tuple[str, ...]]] = {
    "lost": (
        [
            [
                (
                    "{Name} had {a_color_obj}. It was {his} favorite thing in the whole world.",
                    "{His} {elder} had given {him} {a_color_obj} for {his} birthday, and {he} took it "
                    "everywhere.",
                    "Every day, {Name} played with {his} {color} {obj} at {where}.",
                    "{Name} loved {his} {color} {obj} because it reminded {him} of {his} {elder}.",
                ),
                (
                    "{He} kept it {hide} so that nobody would step on it.",
                    "{He} showed it to everyone {he} met.",
                    "",
                ),
            ],
            [
                (EVENT_START),
                (
                    "{Name} looked for the {obj}, but it was gone!",
                    "When {Name} came home, the {obj} was not where {he} had left it.",
                    "{Name} wanted to play with {his} {obj}, but {he} could not find it.",
                ),
                (
                    "{He} looked {hide}. {He} looked {hide2}. But the {obj} was not there.",
                    "{He} searched {hide} and {hide2}, and then {he} searched them again.",
                    "{He} looked high and low, but {he} could not find it anywhere.",
                ),
                (
                    '"Oh no!" cried {Name}. "Where is my {obj}?"',
                    "{Name} felt {bad}. {His} eyes filled with tears.",
                    '"It cannot just disappear," {Name} said to {himself}.',
                ),
            ],
            [
                (
                    'Just then, {fName} came by. "Why do you look so {bad}?" {fhe} asked.',
                    "{fName} saw {Name} sitting on the steps and came over to see what was wrong.",
                    "{Name} ran to find {fName}, who always knew what to do.",
                ),
                (
                    '"I lost my {obj}," said {Name}. "I have looked everywhere."',
                    '"My {obj} is gone," {Name} {say}. "I think I will never see it again."',
                ),
                (
                    '"Don\'t worry," said {fName}. "I will help you look. Four eyes are better than two!"',
                    '"Let\'s think about where you had it last," {fName} said.',
                    '"We will find it together," {fName} promised.',
                ),
                (
                    "Together they walked back to {where} and looked behind every tree and under every "
                    "bench.",
                    "They retraced every step {Name} had taken that day.",
                    "They asked {creature} if it had seen anything, but it only blinked at them.",
                    "",
                ),
            ],
            [
                (
                    "At last, {fName} pointed at something {color} {hide3}. It was the {obj}!",
                    "They found the {obj} {hide3}. {Creature} had been using it as a bed!",
                    "Suddenly {Name} remembered: {he} had left the {obj} {hide3} the night before. "
                    "And there it was!",
                ),
                (
                    '{Name} jumped up and down. "You found it!" {he} shouted.',
                    '{Name} hugged {fName} and said, "Thank you for helping me."',
                    "{Name} held the {obj} tight and felt {good} again.",
                ),
                (
                    "From that day on, {Name} always put the {obj} in a safe place before bed.",
                    "To say thank you, {Name} shared {his} {food} with {fName}.",
                    "",
                ),
            ],
        ],
        _words(
            "it helps to stay calm when something goes wrong|friends help each other|"
            "it is good to keep your things in a safe place|two people can do more than one|"
            "you should never give up too soon"
        ),
    ),
    "fear": (
        [
            [
                (
                    "There was one thing that {Name} did not like at all: {fear}.",
                    "{Name} was brave about most things, but {he} was afraid of {fear}.",
                    "Even though {he} was {trait}, {Name} was scared of {fear}.",
                ),
                (
                    "Whenever {he} thought about it, {his} tummy felt funny.",
                    "{He} did not tell anyone, because {he} felt a little silly.",
                    "When it came near, {he} would hide behind {his} {elder}.",
                ),
            ],
            [
                (EVENT_START),
                (
                    "That day, {Name} had to face {fear}.",
                    "{fName} wanted to play a game, but it meant facing {fear}.",
                ),
                (
                    '"I can\'t do it," {Name} {say}. "I am too {bad}."',
                    '"Do I have to?" {Name} asked in a small voice.',
                    "{Name} stood very still and did not want to move.",
                ),
            ],
            [
                (
                    "{His} {elder} knelt down next to {him}.",
                    "{fName} took {his} hand.",
                    "{His} {elder} gave {him} a warm hug.",
                ),
                (
                    '"Being brave does not mean you are not scared," {ehe} said. "It means you try anyway."',
                    '"Everyone is afraid of something," {ehe} said. "When I was small, I was afraid too."',
                    '"Let\'s take one small step at a time," said {fName}. "I will be right here."',
                    '"Close your eyes, count to five and breathe slowly," {ehe} said.',
                ),
                (
                    "{Name} thought about it for a long time.",
                    "{Name} took a deep breath.",
                    "{Name} looked at {fName}, and {fName} nodded.",
                ),
            ],
            [
                (
                    "Slowly, {Name} tried. It was not as bad as {he} had thought.",
                    "{Name} took one step, and then another. {His} heart was beating fast, but {he} kept "
                    "going.",
                    "At first {his} legs were shaking, but then something surprising happened: {he} started "
                    "to enjoy it.",
                ),
                (
                    '"I did it!" {Name} shouted. "I really did it!"',
                    '"That was fun," {Name} said with a grin. "Can we do it again?"',
                    "Everyone clapped, and {Name} felt {good}.",
                ),
            ],
        ],
        _words(
            "being brave does not mean you are not scared|it is okay to ask for help|"
            "things often look bigger before you try them|a good friend can make you feel brave|"
            "small steps can take you a long way"
        ),
    ),
    "share": (
        [
            [
                (
                    "{Name} had {a_color_obj} that nobody else had.",
                    "{Name} got {a_color_obj} as a present, and {he} was very proud of it.",
                    "At {where}, {Name} found {a_color_obj} that was just the right size.",
                ),
                (
                    "{He} did not want anyone else to touch it.",
                    "{He} held it close and would not let go.",
                    "",
                ),
            ],
            [
                (EVENT_START),
                (
                    '{fName} saw the {obj} and {his_eyes_lit}. "Can I try it?" {fhe} asked.',
                    '"What a nice {obj}," said {fName}. "May I play with it too?"',
                ),
                (
                    '"No," said {Name}. "It is mine." {He} turned away.',
                    '"Maybe later," said {Name}, but {he} did not mean it.',
                    '{Name} shook {his} head. "You will break it," {he} said.',
                ),
                (
                    "{fName} looked {bad} and walked away slowly.",
                    "{fName} did not say anything. {fHe} just went home.",
                ),
            ],
            [
                (
                    "Playing alone was not much fun. The {obj} did not seem so special anymore.",
                    "{Name} played with the {obj} for a while, but soon {he} felt {bad}.",
                    "The afternoon was long and quiet without {fName}.",
                ),
                (
                    '{His} {elder} noticed. "Where is {fName} today?" {ehe} asked.',
                    "{Name} told {his} {elder} what had happened.",
                    "",
                ),
                (
                    '"Things are more fun when we share them," {his} {elder} said gently.',
                    '"How would you feel if {fName} did not share with you?" {his} {elder} asked.',
                    "{Name} remembered how {fName} had once shared {fhis} {food} with {him}.",
                ),
            ],
            [
                (
                    "The next morning, {Name} ran to {fName}'s house with the {obj}.",
                    "{Name} went to find {fName} and held out the {obj}.",
                ),
                (
                    '"I am sorry," {he} said. "Do you want to play with it together?"',
                    '"I was not kind yesterday," said {Name}. "Here, you can have the first turn."',
                ),
                (
                    "{fName} smiled a big smile. They took turns all day and laughed until the sun went "
                    "down.",
                    '"Thank you," said {fName}. Together they invented a new game that was even better.',
                ),
            ],
        ],
        _words(
            "it is better to share|things are more fun when we do them together|"
            "it is important to say sorry|a friend is worth more than any toy|kindness makes everyone happy"
        ),
    ),
    "journey": (
        [
            [
                ("{journey_0}",),
                (
                    "{fName} said {fhe} would come too.",
                    "{He} asked {fName} to come along, and {fName} said yes at once.",
                    "{He} packed {a_obj}, some {food} and a bottle of water.",
                ),
            ],
            [
                (EVENT_START),
                (
                    "They set off early, singing as they walked.",
                    "They walked along the path, past {where2} and over a small hill.",
                    "The road was long, but they were happy to be together.",
                ),
                (
                    "On the way, they saw {creature} and {creature2}.",
                    "They stopped to rest under a big tree and ate some of the {food}.",
                    "",
                ),
            ],
            [
                (
                    "Then they came to {obstacle}.",
                    "But soon there was a problem: {obstacle}.",
                    "After a while, they reached {obstacle}, and they did not know what to do.",
                ),
                (
                    '"How will we get across?" asked {fName}.',
                    '"Maybe we should go home," {Name} {say}.',
                    "They both felt {bad}.",
                ),
                (
                    "Just then, {creature} came by and showed them another way.",
                    "{Name} had an idea. They found a long branch and used it to help each other.",
                    "They thought hard, and then they saw a little path that went around it.",
                ),
            ],
            [
                ("{journey_1}",),
                (
                    "They sat down to rest and shared the last of the {food}.",
                    "They were tired, but they felt {good}.",
                    "",
                ),
            ],
        ],
        _words(
            "a long road is shorter with a friend|problems can be solved if you think calmly|"
            "it is good to help the people you love|every journey begins with one step"
        ),
    ),
    "helping": (
        [
            [
                (
                    "{When}, {Name} was walking to {where} when {he} heard a small sound.",
                    "{When}, {Name} saw something strange near {where}.",
                ),
                (
                    "It was {creature}, and it was hurt.",
                    "It was {creature}. It was stuck and could not get free.",
                    "It was {creature}, and it looked cold and hungry.",
                ),
            ],
            [
                (
                    '"Poor thing," said {Name}. "I will help you."',
                    '"Don\'t be scared," {Name} {say} softly. "I am your friend."',
                ),
                (
                    "{He} carefully picked it up and carried it home.",
                    "{He} wrapped it in {his} {color} scarf to keep it warm.",
                    "{He} ran to get {his} {elder}, who knew a lot about animals.",
                ),
                (
                    "Because it was so small, they made a bed for it in a shoe box.",
                    "{His} {elder} showed {him} how to give it water and some {food}.",
                ),
            ],
            [
                (
                    "Every day, {Name} took care of it. {He} was very patient.",
                    "{fName} came to visit, and together they gave it a name.",
                    "At first it did not eat much, but slowly it grew stronger.",
                ),
                (
                    "After a week, it could move again.",
                    "Soon it was hopping around the kitchen.",
                    "One morning, it was strong enough to go home.",
                ),
            ],
            [
                (
                    "{Name} carried it back to {where} and let it go.",
                    "They opened the door, and it went back outside into the {season} air.",
                ),
                (
                    "{Name} felt a little {bad} to say goodbye, but mostly {he} felt {good}.",
                    "It turned around once, as if to say thank you, and then it was gone.",
                ),
                (
                    "Sometimes, when {Name} walks to {where}, {he} still sees it there.",
                    "",
                ),
            ],
        ],
        _words(
            "even small hands can do big things|taking care of others makes you feel good|"
            "every creature deserves kindness|patience helps things grow strong"
        ),
    ),
    "making": (
        [
            [
                ("{occasion_0}",),
                (
                    "{He} decided to make {craft}.",
                    "After thinking for a long time, {he} chose to make {craft}.",
                ),
            ],
            [
                (
                    "{He} gathered everything {he} needed and cleared the kitchen table.",
                    "{He} worked all afternoon at the kitchen table.",
                    "{He} worked slowly and carefully, just as {his} {elder} had taught {him}.",
                ),
                (
                    "It was hard work, but {he} did not give up.",
                    "Sometimes it went wrong and {he} had to start again.",
                    "",
                ),
            ],
            [
                (
                    "But then disaster struck: {disaster}.",
                    "Just when it was almost finished, {disaster}.",
                ),
                (
                    "{Name} sat down and felt very {bad}.",
                    '"Now it is ruined," {Name} {say}.',
                ),
                (
                    '"It does not have to be perfect," said {his} {elder}. "What matters is that you made it '
                    'with love."',
                    "{fName} came to help, and together they fixed what they could.",
                    "{Name} looked at it again and had a new idea.",
                ),
            ],
            [
                (
                    "In the end, it was a little different from the plan, but it was even better.",
                    "When it was done, it was not perfect, but it was full of color and love.",
                ),
                ("{occasion_1}",),
            ],
        ],
        _words(
            "things do not have to be perfect to be good|mistakes can lead to new ideas|"
            "a gift made with love is the best gift|hard work is worth it"
        ),
    ),
    "race": (
        [
            [
                ("{contest_0}",),
                (
                    "{He} practiced every day, even when it rained.",
                    "{fName} helped {him} practice after school.",
                    "{He} told everyone that {he} would surely win.",
                ),
            ],
            [
                (EVENT_START),
                (
                    "On the day of the contest, {Name} was so {bad} that {his} hands were shaking.",
                    "When the day came, {Name} felt sure that {he} would win.",
                ),
                ("{contest_1}",),
                (
                    "{He} did not win.",
                    "Someone else won the prize.",
                    "In the end, {he} came last.",
                ),
            ],
            [
                (
                    "{Name} felt {bad}. {He} wanted to go home and hide.",
                    '"I practiced so much," {Name} {say}. "It is not fair."',
                ),
                (
                    '"You did not win today," said {his} {elder}, "but look how far you came."',
                    '"Winning is nice," said {fName}, "but trying is what makes you stronger."',
                    "{fName} sat down next to {him} and shared {fhis} {food}.",
                ),
            ],
            [
                ("{contest_2}",),
                (
                    "{He} did not come first, but {he} finished with a big smile.",
                    "This time {he} came second, and {he} was prouder than ever.",
                    "And this time, to everyone's surprise, {he} won!",
                ),
            ],
        ],
        _words(
            "slow and steady can win the race|trying is more important than winning|"
            "you learn more from falling than from winning|practice makes you better, not perfect"
        ),
    ),
    "noise": (
        [
            [
                (
                    "One night, when everyone was asleep, {Name} heard a strange noise.",
                    "In the middle of the night, {Name} woke up. Something was making a noise {hide}.",
                ),
                (
                    "It went {sound}, {sound}, and then it stopped.",
                    "First it was quiet, then {sound}! Then quiet again.",
                ),
                (
                    "{Name} pulled the blanket up to {his} nose.",
                    "{His} heart was beating fast.",
                ),
            ],
            [
                (
                    '"Who is there?" {he} whispered. Nobody answered.',
                    "{Name} wanted to call {his} {elder}, but {he} wanted to be brave too.",
                ),
                (
                    "{He} took {his} {obj} and crept out of bed.",
                    "{He} tiptoed along the hall, one step at a time.",
                ),
                (
                    "The noise came again: {sound}!",
                    "Now the noise was louder.",
                ),
            ],
            [
                (
                    "{Name} opened the door slowly and looked {hide2}.",
                    "{Name} turned on the light.",
                ),
                (
                    "There, looking back at {him}, was {creature}!",
                    "It was only {creature}, trying to get some {food}.",
                ),
                (
                    '{Name} laughed. "You scared me!" {he} said.',
                    "{Name} was so surprised that {he} started to giggle.",
                ),
            ],
            [
                (
                    "In the morning, {Name} told {his} {elder} everything.",
                    "The next day, {Name} told {fName} the whole story.",
                ),
                (
                    "They put out a little {food} for the visitor every night after that.",
                    "They made a small house for it in the garden so it would not be cold.",
                    "",
                ),
            ],
        ],
        _words(
            "many scary things are not so scary when you look closely|the dark is the same room without "
            "light|"
            "it is good to be curious"
        ),
    ),
    "garden": (
        [
            [
                (
                    "{Name}'s {elder} gave {him} a small packet of seeds.",
                    "At the market, {Name} bought some seeds with {his} own money.",
                ),
                (
                    '"If you take good care of them, they will grow into {plant}," {ehe} said.',
                    "On the packet was a picture of {plant}.",
                ),
            ],
            [
                (
                    "{Name} dug a little hole at the sunny end of the garden and planted the seeds.",
                    "{He} filled a pot with soft earth, pushed the seeds in and gave them some water.",
                ),
                (
                    "Then {he} waited. And waited. Nothing happened.",
                    "Every morning, {he} ran outside to look, but there was only brown earth.",
                ),
                (
                    '"Why are they not growing?" {Name} asked. "Maybe they are broken."',
                    "{Name} felt {bad}, and {he} almost gave up.",
                ),
            ],
            [
                (
                    '"Seeds need time," said {his} {elder}. "Water them, and be patient."',
                    '"Good things take time," said {fName}. "My {elder} says so."',
                ),
                (
                    "So {Name} kept watering them every day, even when {he} was busy.",
                    "So {he} kept going. {He} pulled out the weeds and chased away the snails.",
                ),
            ],
            [
                (
                    "One day, there it was: a tiny green shoot!",
                    "Then, after many days, little green leaves pushed up through the earth.",
                ),
                (
                    "By the end of {season}, the garden was full of {plant}.",
                    "Soon the plants were taller than {Name}, and they were covered in {plant}.",
                ),
                (
                    "{Name} picked some and gave them to everyone on the street.",
                    "{He} shared them with {fName} and {his} {elder}.",
                    "",
                ),
            ],
        ],
        _words(
            "patience brings good things|good things take time|"
            "if you take care of something, it will grow|small seeds can become something big"
        ),
    ),
}

# Choices that several stages of one plot must agree on: each option is a tuple of sentences that fill
# the slots {name_0}, {name_1}, ...
PAIRS: dict[str, tuple[tuple[str, ...], ...]] = {
    "contest": (
        (
            "Every year there was a big race at {where}, and this year {Name} wanted to run in it.",
            "But halfway through, {he} tripped and fell.",
            "The next year, {Name} ran again. This time {he} started slowly and kept going.",
        ),
        (
            "{Name} wanted to win the swimming contest at the lake.",
            "But {he} swallowed some water and had to stop and cough.",
            "All summer, {Name} kept swimming, not to win, but because {he} enjoyed it.",
        ),
        (
            "The children were having a contest to see who could build the tallest tower of blocks.",
            "But {he} built too fast, and the whole tower came crashing down.",
            "The next time, {Name} built slowly, one careful block at a time.",
        ),
        (
            "There was a spelling contest at school, and {Name} wanted to win it.",
            "But when it was {his} turn, {he} forgot a letter in a very easy word.",
            "{Name} kept reading every evening, not to win, but because {he} liked learning new words.",
        ),
    ),
    "occasion": (
        (
            "Tomorrow was {fName}'s birthday, and {Name} wanted to make a special present.",
            "{fName} said it was the best present {fhe} had ever had.",
        ),
        (
            "The big summer fair was coming, and {Name} wanted to make something for it.",
            "At the fair, people stopped to look at it and smiled.",
        ),
        (
            "{Name}'s {elder} had been sick, and {Name} wanted to make something to cheer {ehim} up.",
            "When {his} {elder} saw it, {ehe} laughed and laughed and felt much better.",
        ),
        (
            "It was nearly the end of the school year, and {Name} wanted to make a thank-you gift for the "
            "teacher.",
            "The teacher put it on the desk where everyone could see it.",
        ),
    ),
    "journey": (
        (
            "{Name}'s {elder} asked {him} to take a basket of {food} to {his} {elder2}, who lived on the "
            "other side of {where}.",
            "At last they arrived. {His} {elder2} was waiting at the door with a big smile. "
            '"You came all this way!" {ehe2} said. "Come in and get warm."',
        ),
        (
            "{Name} had always wanted to see {landmark}, which was far away.",
            "When they reached the end of the road, they could finally see {landmark}. It was even more "
            "beautiful than {Name} had imagined.",
        ),
        (
            "{Name} and {fName} decided to find the place where the river began.",
            "At last they found it: a tiny spring bubbling out from under a mossy rock. "
            '"This is where the river begins," whispered {fName}.',
        ),
    ),
}

FEARS = _words(
    "the dark|thunder|deep water|big dogs|the tall slide|the dentist|loud fireworks|spiders|"
    "climbing high trees|riding a bike without help|speaking in front of the class|the first day at school|"
    "swimming in the sea|sleeping away from home|going down into the cellar"
)
OBSTACLES = _words(
    "a wide river with no bridge|a tree that had fallen across the path|a thick fog that hid the way|"
    "a muddy field that was much too deep|a fork in the road with no sign|a steep rocky hill|"
    "a gate that was locked|a stream that had flooded after the rain"
)
LANDMARKS = _words(
    "the old lighthouse|the waterfall in the hills|the castle on the cliff|the giant oak tree|"
    "the big city market|the snowy mountain top|the lake of lilies|the windmill by the sea"
)
CRAFTS = _words(
    "a paper lantern|a birthday card with gold stars|a cake with three layers|a wooden bird house|"
    "a necklace of shells|a painting of the sea|a little puppet theater|a quilt of colored squares|"
    "a kite with a long tail|a clay bowl"
)
DISASTERS = _words(
    "the cat knocked it off the table|a gust of wind blew it into the pond|the dog ran off with it|"
    "someone sat on it by mistake|it slipped off the table and broke in two|"
    "a cup of juice fell over and spilled all over it"
)
SOUNDS = _words("tap|creak|bump|scratch|thump|rustle|squeak|knock|clink|whoosh")
PLANTS = _words(
    "tall yellow sunflowers|red tomatoes|sweet peas|orange pumpkins|purple beans|bright poppies|"
    "fat green cucumbers|sweet strawberries|white daisies|crunchy carrots"
)
EYES_LIT = _words("{fhis} eyes lit up|{fhe} clapped {fhis} hands|{fhe} smiled")


# ---------------------------------------------------------------------------------------------------
# Scenery details: optional sentences sprinkled into stories. They draw on larger word tables so that
# the public domain has a broad everyday vocabulary rather than the same few hundred words.
# ---------------------------------------------------------------------------------------------------

DETAIL_TABLES: dict[str, tuple[str, ...]] = {
    "bird": _words(
        "blackbird|robin|magpie|wren|seagull|heron|pigeon|starling|swallow|woodpecker|kingfisher|finch|"
        "thrush|jay|goldfinch|lark|stork|hawk|kestrel|cuckoo|nightingale|puffin|pelican|flamingo"
    ),
    "bird_doing": _words(
        "circling slowly|singing its morning song|diving toward the water|gliding on the wind|"
        "carrying a twig to its nest|chasing a smaller bird|resting on a chimney|calling to its friends"
    ),
    "flower": _words(
        "daisies|buttercups|tulips|bluebells|poppies|lavender|marigolds|violets|dandelions|forget-me-nots|"
        "foxgloves|snowdrops|daffodils|lilies|clover|cornflowers|honeysuckle|primroses|heather|orchids"
    ),
    "tree": _words(
        "willow|birch|chestnut|maple|beech|elm|cherry tree|pear tree|walnut tree|holly bush|hazel|"
        "linden|poplar|fir|cedar|palm tree|olive tree|rowan|yew|sycamore"
    ),
    "insect": _words(
        "ladybird|dragonfly|grasshopper|bumblebee|beetle|moth|caterpillar|cricket|firefly|wasp|"
        "damselfly|butterfly|shield bug|mayfly"
    ),
    "clothing": _words(
        "raincoat|sweater|woolly hat|boots|sandals|overalls|jacket|dress|cardigan|shorts|dungarees|"
        "pajamas|apron|gloves|cap|cloak|waistcoat|slippers|poncho|sun hat"
    ),
    "building": _words(
        "the bakery|the post office|the fire station|the old church|the library|the baker's van|"
        "the school|the toy shop|the train station|the flower shop|the town hall|the museum|"
        "the bookshop|the butcher's shop|the ice cream parlor|the barber's shop|the little chapel|"
        "the greengrocer's|the hardware store|the cafe on the corner"
    ),
    "smell": _words(
        "fresh bread|wet grass|pine needles|warm chocolate|salty sea air|cut hay|wood smoke|"
        "roses after the rain|oranges|cinnamon|hot soup|new paint|ripe strawberries|toasted nuts"
    ),
    "sound_desc": _words(
        "the bells of the church|children laughing in the distance|the rumble of a tractor|"
        "waves crashing on the rocks|leaves rustling in the wind|a dog barking somewhere|"
        "the tick of a big clock|a train whistle far away|rain drumming on a tin roof|"
        "ducks quacking on the pond|the clatter of plates in a kitchen|a cow mooing in a field"
    ),
    "vehicle": _words(
        "bus|tractor|bicycle|delivery van|fire engine|steam train|tram|sailboat|ferry|hot air balloon|"
        "ice cream van|motorbike|horse and cart|rowing boat|taxi|garbage truck"
    ),
    "good": _words(
        "cabbages|pumpkins|melons|onions|fresh fish|eggs|jars of jam|loaves of bread|wheels of cheese|"
        "wooden spoons|woolen socks|baskets|candles|flowerpots|soap|honey cakes|leeks|radishes|mushrooms|"
        "peaches|apricots|lemons|spices|rolls of ribbon|buttons|clay pots|sausages|figs|herbs|walnuts|"
        "copper kettles|straw hats|embroidered cushions|pickled cucumbers|smoked salmon|almonds|dates|"
        "hazelnuts|olives|goat cheese|brooms|buckets|lanterns|saddles|wicker chairs|teacups|silk scarves|"
        "paper kites|toy drums|marmalade|gingerbread men|pretzels|chestnuts|blankets|pottery jugs"
    ),
    "kitchen": _words(
        "kettle|teapot|frying pan|mixing bowl|rolling pin|wooden spoon|bread bin|cookie jar|egg cup|"
        "saucepan|sieve|ladle|whisk|chopping board|cake tin|fruit bowl|pepper mill"
    ),
    "texture": _words(
        "soft and springy|hard and dusty|wet and slippery|crunchy with frost|warm from the sun|"
        "covered in moss|sticky with mud|smooth and cool|bumpy with stones|thick with fallen leaves"
    ),
    "landform": _words(
        "hills|mountains|valley|cliffs|dunes|marsh|moor|meadows|canyon|fields|island|woods|bay|ridge"
    ),
    "sky_color": _words("pink|orange|purple|golden|pale blue|deep blue|gray|red|silver"),
    "adverb": _words(
        "Slowly|Quietly|Happily|Carefully|Quickly|Cheerfully|Bravely|Gently|Eagerly|Proudly|Sleepily|"
        "Softly|Hopefully|Nervously|Patiently|Calmly"
    ),
    "moved": _words(
        "walked|wandered|skipped|hurried|strolled|marched|tiptoed|raced|hopped|trotted|ran|dashed|"
        "shuffled|plodded|scampered|climbed"
    ),
    "instrument": _words(
        "violin|trumpet|accordion|guitar|harmonica|piano|flute|banjo|cello|tambourine|xylophone|harp"
    ),
    "bodypart": _words("nose|hand|shoulder|knee|hat|sleeve|ear|finger|arm|foot"),
    "shape": _words("circle|square|star|heart|triangle|spiral|moon|zigzag|diamond"),
    "material": _words("wood|straw|brick|stone|glass|clay|paper|wool|silk|cotton|leather|metal"),
}

DETAILS = (
    "On the way, {he} passed {building} and {building2}.",
    "The air smelled of {smell}.",
    "High in the sky, {a_bird} was {bird_doing}.",
    "{Name} was wearing {his} {color} {clothing}.",
    "Along the path grew {flower} and {flower2}.",
    "{adverb}, {Name} {moved} toward {where}.",
    "{A_insect} landed on {his} {bodypart} and then flew away.",
    "Somewhere nearby, someone was playing {a_instrument}.",
    "At the market, the stalls were full of {good}, {good2} and {good3}.",
    "Under {a_tree}, {creature} was taking a nap.",
    "{He} could hear {sound_desc}.",
    "{A_vehicle} went past, and {Name} waved.",
    "In the kitchen, {a_kitchen} stood next to {a_kitchen2}.",
    "The ground was {texture} under {his} feet.",
    "Beyond the {landform}, the sky was turning {sky_color}.",
    "{Name} drew {a_shape} in the dust with a stick.",
    "Nearby stood a little house made of {material}, with {flower} in the window boxes.",
    "{His} {elder} was busy with the {kitchen} and hummed a tune.",
    "From the window, {he} could see {building} and, far away, the {landform}.",
    "{Name} stopped to smell the {flower}.",
    "A {bird} sat on the fence and watched {him} with bright eyes.",
    "Every few steps, {he} picked up a stone or a leaf and put it in {his} pocket.",
)


def _detail(r: Rand, c: dict[str, str]) -> str:
    """One scenery sentence, its table slots drawn fresh (two of a kind are kept distinct)."""
    slots = dict(c)
    for key, table in DETAIL_TABLES.items():
        first, second, third = r.picks(table, 3)
        slots[key], slots[key + "2"], slots[key + "3"] = first, second, third
        slots["a_" + key], slots["a_" + key + "2"] = _a(first), _a(second)
        slots["A_" + key] = _cap(_a(first))
    return r.pick(DETAILS).format(**slots)


def _character(r: Rand, avoid: str = "") -> dict[str, str]:
    """Name, kind and pronouns of one story character."""
    pron = r.pick(("she", "he"))
    name = avoid
    while name == avoid:
        name = r.pick(GIRL_NAMES if pron == "she" else BOY_NAMES)
    kind = r.pick(CHILD_KINDS[pron]) if r.chance(0.45) else r.pick(ANIMAL_KINDS)
    if r.chance(0.6):
        kind = f"{r.pick(SIZE_WORDS)} {kind}"
    her = "her" if pron == "she" else "him"
    his = "her" if pron == "she" else "his"
    return {"name": name, "kind": kind, "he": pron, "him": her, "his": his, "himself": her + "self"}


def _story_context(r: Rand, plot: str) -> dict[str, str]:
    """Every slot a story template may use, drawn once so that the story stays consistent."""
    hero = _character(r)
    friend = _character(r, avoid=hero["name"])
    elder, elder2 = r.picks(ELDERS, 2)
    season = r.pick(tuple(SEASONS))
    obj, color = r.pick(OBJECTS), r.pick(COLORS)
    hides = r.picks(HIDES, 3)
    creatures = r.picks(CREATURES, 2)
    c = {
        "Name": hero["name"],
        "he": hero["he"],
        "him": hero["him"],
        "his": hero["his"],
        "himself": hero["himself"],
        "a_trait_kind": _a(f"{r.pick(TRAITS)} {hero['kind']}"),
        "fName": friend["name"],
        "fhe": friend["he"],
        "fhim": friend["him"],
        "fhis": friend["his"],
        "a_ftrait_fkind": _a(f"{r.pick(TRAITS)} {friend['kind']}"),
        "elder": elder,
        "elder2": elder2,
        "ehe": ELDER_PRONOUN[elder],
        "ehim": "her" if ELDER_PRONOUN[elder] == "she" else "him",
        "ehe2": ELDER_PRONOUN[elder2],
        "home": r.pick(HOMES),
        "hobby": r.pick(HOBBIES),
        "hobby2": r.pick(HOBBIES),
        "trait": r.pick(TRAITS),
        "where": r.pick(OUTDOORS),
        "where2": r.pick(OUTDOORS),
        "When": r.pick(WHENS),
        "season": season,
        "weather": r.pick(SEASONS[season]),
        "obj": obj,
        "color": color,
        "a_obj": _a(obj),
        "a_color_obj": _a(f"{color} {obj}"),
        "hide": hides[0],
        "hide2": hides[1],
        "hide3": hides[2],
        "creature": creatures[0],
        "creature2": creatures[1],
        "food": r.pick(FOODS),
        "good": r.pick(GOOD),
        "bad": r.pick(BAD),
        "say": r.pick(SAY),
        "fear": r.pick(FEARS),
        "obstacle": r.pick(OBSTACLES),
        "landmark": r.pick(LANDMARKS),
        "craft": r.pick(CRAFTS),
        "disaster": r.pick(DISASTERS),
        "sound": r.pick(SOUNDS),
        "plant": r.pick(PLANTS),
        "moral": r.pick(PLOTS[plot][1]),
    }
    c["his_eyes_lit"] = r.pick(EYES_LIT).format(**c)
    # Capitalised variants for sentence starts ({He}, {His}, {fHe}, {Creature}, ...).
    for key in ("he", "his", "fhe", "fhis", "creature"):
        c[key[0] + key[1:].capitalize() if key[0] == "f" else key.capitalize()] = _cap(c[key])
    for name, options in PAIRS.items():
        for i, sentence in enumerate(r.pick(options)):
            c[f"{name}_{i}"] = sentence.format(**c)
    return c


def _render(r: Rand, stages: list[tuple[str, ...]], c: dict[str, str], detail: float = 0.0) -> str:
    """One paragraph: an alternative from each stage, filled in, skipping empty alternatives.

    With probability ``detail``, a scenery sentence is added at the end.
    """
    parts = [r.pick(stage).format(**c) for stage in stages]
    if r.chance(detail):
        parts.append(_detail(r, c))
    return " ".join(p for p in parts if p)


def story(r: Rand) -> str:
    """One short story: opening, a plot in three or four paragraphs, a moral and a closing line."""
    plot = r.pick(tuple(PLOTS))
    c = _story_context(r, plot)
    paras = [_render(r, OPENING, c)]
    # scenery only in the first two plot paragraphs, where the scene is being set
    paras += [_render(r, p, c, detail=0.6 if i < 2 else 0.0) for i, p in enumerate(PLOTS[plot][0])]
    paras.append(_render(r, ENDINGS, c))
    return "\n\n".join(p for p in paras if p) + "\n"


# ---------------------------------------------------------------------------------------------------
# Expository texts: fact tables and templates
# ---------------------------------------------------------------------------------------------------

# name, plural, class, habitat, diet, special feature, one more fact
ANIMALS: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    (
        "elephant",
        "elephants",
        "mammal",
        "the grasslands and forests of Africa and Asia",
        "grass, leaves, bark and fruit",
        "a long trunk that it uses to breathe, smell, drink and pick things up",
        "Elephants live in family groups that are led by an older female.",
    ),
    (
        "giraffe",
        "giraffes",
        "mammal",
        "the open savannas of Africa",
        "leaves from tall trees",
        "a very long neck that lets it reach leaves that other animals cannot",
        "A giraffe has a dark tongue that can be almost half a meter long.",
    ),
    (
        "penguin",
        "penguins",
        "bird",
        "the cold seas and coasts of the southern half of the world",
        "fish, squid and tiny shrimp called krill",
        "wings shaped like flippers that are perfect for swimming",
        "Penguins cannot fly, but some of them can swim faster than a person can run.",
    ),
    (
        "owl",
        "owls",
        "bird",
        "forests, fields and even old barns",
        "mice, voles, insects and small birds",
        "large eyes and soft feathers that let it fly almost without a sound",
        "An owl can turn its head much further around than a person can.",
    ),
    (
        "frog",
        "frogs",
        "amphibian",
        "ponds, marshes and damp forests",
        "insects, worms and slugs",
        "long back legs that help it jump many times its own length",
        "Many frogs can take in water and air through their thin skin.",
    ),
    (
        "honeybee",
        "honeybees",
        "insect",
        "hives in trees, walls and wooden boxes made by beekeepers",
        "nectar and pollen from flowers",
        "a special dance that tells other bees where to find flowers",
        "A single hive can hold tens of thousands of bees.",
    ),
    (
        "dolphin",
        "dolphins",
        "mammal",
        "oceans and some large rivers",
        "fish and squid",
        "clicks and whistles that it uses to talk to other dolphins and to find food",
        "Dolphins must come up to the surface to breathe air through a hole on top of their heads.",
    ),
    (
        "camel",
        "camels",
        "mammal",
        "the deserts of Africa and Asia",
        "dry grass, thorny plants and leaves",
        "a hump that stores fat, which the camel can live on when food is scarce",
        "A thirsty camel can drink a huge amount of water in just a few minutes.",
    ),
    (
        "turtle",
        "turtles",
        "reptile",
        "seas, rivers, lakes and marshes",
        "plants, jellyfish, snails and worms",
        "a hard shell that protects its soft body",
        "Sea turtles come back to beaches to lay their eggs in the sand.",
    ),
    (
        "octopus",
        "octopuses",
        "mollusk",
        "rocky places on the sea floor",
        "crabs, shrimp and shellfish",
        "eight arms covered in suckers",
        "An octopus can change the color of its skin to hide from danger.",
    ),
    (
        "squirrel",
        "squirrels",
        "mammal",
        "woods, parks and gardens",
        "nuts, seeds, buds and fruit",
        "a bushy tail that helps it balance when it jumps between branches",
        "In autumn, squirrels bury nuts so that they have food in winter.",
    ),
    (
        "eagle",
        "eagles",
        "bird",
        "mountains, coasts and large forests",
        "fish, rabbits and other small animals",
        "very sharp eyes that can spot a rabbit from high in the sky",
        "Eagles build large nests of sticks, often high in a tree or on a cliff.",
    ),
    (
        "butterfly",
        "butterflies",
        "insect",
        "meadows, gardens and forests",
        "nectar from flowers",
        "four colorful wings covered in tiny scales",
        "A butterfly starts life as a caterpillar and changes its shape inside a case called a chrysalis.",
    ),
    (
        "polar bear",
        "polar bears",
        "mammal",
        "the ice and cold coasts around the North Pole",
        "seals and fish",
        "thick white fur and a layer of fat that keep it warm",
        "Under its white fur, a polar bear has black skin that soaks up the heat of the sun.",
    ),
    (
        "kangaroo",
        "kangaroos",
        "mammal",
        "the grasslands and open forests of Australia",
        "grass and leaves",
        "strong back legs for hopping and a pouch where its baby grows",
        "A baby kangaroo is called a joey.",
    ),
    (
        "bat",
        "bats",
        "mammal",
        "caves, old buildings and hollow trees",
        "insects or fruit",
        "wings made of thin skin stretched between long fingers",
        "Many bats find their way in the dark by listening to the echoes of their own calls.",
    ),
    (
        "salmon",
        "salmon",
        "fish",
        "rivers and the open sea",
        "insects, shrimp and smaller fish",
        "the strength to swim up rivers and even leap up small waterfalls",
        "Salmon are born in rivers, grow up in the sea and return to the river where they were born.",
    ),
    (
        "snail",
        "snails",
        "mollusk",
        "gardens, woods and ponds",
        "leaves and rotting plants",
        "a spiral shell that it carries on its back",
        "A snail moves on a trail of slime that it makes itself.",
    ),
    (
        "ant",
        "ants",
        "insect",
        "nests under the ground, in wood or under stones",
        "seeds, sugar and small insects",
        "the strength to carry things much heavier than its own body",
        "Ants live in large groups called colonies, and each ant has its own job.",
    ),
    (
        "crocodile",
        "crocodiles",
        "reptile",
        "warm rivers, lakes and swamps",
        "fish, birds and larger animals",
        "powerful jaws and a long tail that pushes it through the water",
        "A crocodile can stay very still for hours while it waits for food to come close.",
    ),
    (
        "hedgehog",
        "hedgehogs",
        "mammal",
        "hedges, gardens and woodland edges",
        "beetles, worms and slugs",
        "a back covered in sharp spines",
        "When it is frightened, a hedgehog rolls itself into a prickly ball.",
    ),
    (
        "parrot",
        "parrots",
        "bird",
        "warm forests",
        "fruit, nuts and seeds",
        "a strong curved beak that can crack hard nuts",
        "Some parrots can copy the sounds they hear, even human words.",
    ),
    (
        "whale",
        "whales",
        "mammal",
        "all the oceans of the world",
        "krill, fish or squid",
        "an enormous body; the blue whale is the largest animal that has ever lived",
        "Whales sing long songs that can travel far through the water.",
    ),
    (
        "spider",
        "spiders",
        "arachnid",
        "almost every place on land",
        "insects",
        "silk that it spins into webs to catch its food",
        "Spiders have eight legs, which is one way to tell them apart from insects.",
    ),
    (
        "horse",
        "horses",
        "mammal",
        "farms and open grasslands",
        "grass, hay and oats",
        "long legs and strong hooves made for running",
        "Horses can sleep standing up because their legs can lock in place.",
    ),
    (
        "lizard",
        "lizards",
        "reptile",
        "deserts, forests and rocky hills",
        "insects and spiders",
        "a tail that some kinds can drop to escape from danger",
        "Lizards often lie in the sun in the morning to warm their bodies.",
    ),
    (
        "swan",
        "swans",
        "bird",
        "lakes, rivers and quiet ponds",
        "water plants and small creatures",
        "a long curved neck that reaches plants under the water",
        "Young swans are gray and fluffy and are called cygnets.",
    ),
    (
        "zebra",
        "zebras",
        "mammal",
        "the plains of Africa",
        "grass",
        "black and white stripes that are different on every zebra",
        "Zebras live in herds and keep watch for lions together.",
    ),
    (
        "beaver",
        "beavers",
        "mammal",
        "rivers and streams near forests",
        "bark, twigs and water plants",
        "large front teeth that never stop growing",
        "Beavers build dams of sticks and mud that turn streams into ponds.",
    ),
    (
        "jellyfish",
        "jellyfish",
        "sea creature",
        "every ocean",
        "tiny animals that drift in the water",
        "a soft bell-shaped body with long stinging tentacles",
        "A jellyfish has no brain and no bones, and its body is mostly water.",
    ),
)

CLASS_FACTS = {
    "mammal": "Like all mammals, {plural} are warm-blooded, have hair or fur, and feed their young with "
    "milk.",
    "bird": "Like all birds, {plural} have feathers and a beak, and they hatch from eggs.",
    "reptile": "Like other reptiles, {plural} have dry, scaly skin and depend on the sun to keep warm.",
    "amphibian": "Like other amphibians, {plural} usually begin life in water and later live on land.",
    "insect": "Like every insect, the {name} has six legs and a body in three parts.",
    "fish": "Like other fish, {plural} breathe through gills that take oxygen from the water.",
    "mollusk": "The {name} is a mollusk, a soft-bodied animal related to clams and slugs.",
    "arachnid": "The {name} is an arachnid, not an insect.",
    "sea creature": "The {name} is one of the oldest kinds of animals in the sea.",
}

# name, what it is used for, what it is made of, a tip
TOOLS: tuple[tuple[str, str, str, str], ...] = (
    (
        "hammer",
        "driving nails into wood and breaking things apart",
        "a heavy metal head on a wooden or plastic handle",
        "Hold it near the end of the handle, and keep your fingers away from the nail.",
    ),
    (
        "saw",
        "cutting wood, plastic or metal",
        "a thin blade with a row of sharp teeth",
        "Let the saw do the work, and push it with long, steady strokes.",
    ),
    (
        "shovel",
        "digging holes and moving earth, sand or snow",
        "a wide metal blade on a long handle",
        "Bend your knees when you lift, so that your legs do the work and not your back.",
    ),
    (
        "ladder",
        "reaching high places",
        "two long rails joined by steps called rungs",
        "Always stand it on flat ground and ask someone to hold the bottom.",
    ),
    (
        "needle",
        "sewing cloth together",
        "a thin piece of steel with a sharp point and a small hole called an eye",
        "Keep needles in a pincushion so that nobody steps on them.",
    ),
    (
        "compass",
        "finding directions",
        "a magnetic needle that turns freely inside a case",
        "Keep it away from magnets and metal, which pull the needle the wrong way.",
    ),
    (
        "wheelbarrow",
        "carrying heavy loads over short distances",
        "a tub on one wheel with two handles",
        "Put the heaviest part of the load near the wheel so that it is easier to lift.",
    ),
    (
        "screwdriver",
        "turning screws",
        "a metal shaft with a shaped tip and a handle",
        "Use a tip that fits the head of the screw exactly, or the screw may be damaged.",
    ),
    (
        "microscope",
        "looking at things too small to see with the eye alone",
        "lenses, a light and a small stage",
        "Start with the weakest lens and turn the knob slowly to bring things into focus.",
    ),
    (
        "broom",
        "sweeping dust and dirt from floors",
        "stiff bristles tied to a long handle",
        "Sweep toward one spot, then collect the pile with a dustpan.",
    ),
    (
        "thermometer",
        "measuring how hot or cold something is",
        "a thin tube or a small electronic sensor",
        "Wait a little while before reading it, so that it has time to reach the right temperature.",
    ),
    (
        "rake",
        "gathering leaves and smoothing soil",
        "a row of teeth on the end of a long pole",
        "Lay it down with the teeth facing the ground so that nobody steps on them.",
    ),
    (
        "wrench",
        "tightening and loosening nuts and bolts",
        "strong steel with jaws that grip",
        "Pull the wrench toward you rather than pushing it, so that your hand does not slip.",
    ),
    (
        "scissors",
        "cutting paper, cloth and string",
        "two blades joined in the middle",
        "Carry scissors with the points facing down.",
    ),
    (
        "telescope",
        "seeing things that are very far away",
        "lenses or mirrors inside a long tube",
        "Never point it at the sun, because the bright light can hurt your eyes.",
    ),
    (
        "fishing rod",
        "catching fish",
        "a long bendy pole with a line, a reel and a hook",
        "Look behind you before you cast, so that the hook does not catch anyone.",
    ),
    (
        "drill",
        "making round holes",
        "a spinning bit driven by a motor or by hand",
        "Wear glasses to protect your eyes from flying dust.",
    ),
    (
        "paintbrush",
        "spreading paint",
        "soft bristles fixed to a handle",
        "Wash it as soon as you finish, before the paint dries in the bristles.",
    ),
    (
        "plow",
        "turning over the soil before planting",
        "a curved blade pulled through the field",
        "Long ago plows were pulled by horses or oxen; today most are pulled by tractors.",
    ),
    (
        "magnifying glass",
        "making small things look bigger",
        "a curved lens in a frame with a handle",
        "Move it slowly toward and away from the object until it looks sharp.",
    ),
    (
        "chisel",
        "carving and shaping wood or stone",
        "a flat steel blade with a sharp edge",
        "Always cut away from your body, and keep the edge sharp.",
    ),
    (
        "trowel",
        "digging small holes and planting seedlings",
        "a small pointed scoop on a short handle",
        "Clean the soil off after use so that it does not rust.",
    ),
    (
        "spirit level",
        "checking that a shelf or a picture is straight",
        "a bar with a bubble in a small tube of liquid",
        "When the bubble sits exactly between the two lines, the surface is level.",
    ),
    (
        "sewing machine",
        "stitching cloth quickly",
        "a motor that moves a needle up and down very fast",
        "Keep your fingers well away from the needle while it is running.",
    ),
    (
        "pulley",
        "lifting heavy loads with less effort",
        "a wheel with a groove that a rope runs around",
        "Using two or more pulleys together makes a load even easier to lift.",
    ),
)

WEATHER: dict[str, tuple[str, ...]] = {
    "Rain": (
        "Rain begins as tiny drops of water in the clouds.",
        "When many small drops bump into each other, they join together and grow heavier.",
        "When the drops become too heavy to float, they fall to the ground as rain.",
        "Rain fills rivers, lakes and wells, and it gives plants the water they need to grow.",
        "After the rain, the water slowly soaks into the soil or flows back toward the sea.",
        "A light, fine rain is sometimes called drizzle, and a sudden heavy rain is called a downpour.",
    ),
    "Snow": (
        "Snow forms when the air inside a cloud is colder than the freezing point of water.",
        "Tiny ice crystals grow on specks of dust and join together to make snowflakes.",
        "Most snowflakes have six sides, and no two of them look exactly alike.",
        "A layer of snow can keep the ground beneath it warmer, which protects plants and small animals.",
        "When the weather warms up in spring, melting snow fills streams and rivers.",
    ),
    "Thunder and lightning": (
        "Lightning is a giant spark of electricity that jumps inside a cloud or between a cloud and the "
        "ground.",
        "It heats the air around it so quickly that the air bursts outward with a loud noise: thunder.",
        "Light travels much faster than sound, so we see the flash before we hear the rumble.",
        "By counting the seconds between the flash and the thunder, you can tell whether a storm is near "
        "or far.",
        "During a storm, the safest place is inside a building or a car, away from tall trees.",
    ),
    "Wind": (
        "Wind is air that moves from one place to another.",
        "When the sun warms some places more than others, warm air rises and cooler air rushes in to take "
        "its place.",
        "A gentle wind is called a breeze, and a very strong one is called a gale.",
        "People have used the wind for thousands of years to sail boats and to turn windmills.",
        "Wind also carries seeds, spreading plants to new places.",
    ),
    "Fog": (
        "Fog is a cloud that touches the ground.",
        "It forms when warm, damp air cools down so much that the water in it turns into tiny floating "
        "drops.",
        "Fog is common in the early morning near rivers, lakes and the sea.",
        "Because fog makes it hard to see, ships sound horns and lighthouses shine their lamps to warn "
        "others.",
        "When the sun warms the air, the fog usually disappears.",
    ),
    "Rainbows": (
        "A rainbow appears when sunlight shines through drops of water in the air.",
        "Each drop bends the light and splits it into its colors.",
        "The colors always appear in the same order: red, orange, yellow, green, blue, indigo and violet.",
        "To see a rainbow, you must stand with the sun behind you and the rain in front of you.",
        "Sometimes a second, paler rainbow appears outside the first, with its colors in the opposite order.",
    ),
    "Clouds": (
        "Clouds are made of billions of tiny drops of water or crystals of ice.",
        "Puffy white clouds that look like cotton are called cumulus clouds.",
        "Thin, feathery clouds high in the sky are called cirrus clouds, and they are made of ice.",
        "Flat gray clouds that cover the whole sky are called stratus clouds, and they often bring drizzle.",
        "Tall, dark clouds can grow into thunderstorms.",
    ),
    "Seasons": (
        "The Earth is tilted, and as it travels around the sun each year, this tilt gives us the seasons.",
        "When our half of the Earth leans toward the sun, the days are long and warm, and it is summer.",
        "When it leans away, the sun stays low in the sky, the days are short, and it is winter.",
        "Spring and autumn come in between, when the days and nights are closer to the same length.",
        "Near the middle of the Earth, it stays warm all year, and people talk about wet and dry seasons "
        "instead.",
    ),
    "Frost and dew": (
        "On clear, calm nights, the ground loses its warmth and becomes cooler than the air.",
        "Water from the air then settles on grass and leaves as small drops called dew.",
        "If the ground is colder than the freezing point, the water turns straight into ice crystals, "
        "and we call it frost.",
        "Frost can draw beautiful feathery patterns on windows.",
        "Gardeners cover young plants on cold nights to protect them from frost.",
    ),
    "Hail": (
        "Hail is made of balls of ice that fall from thunderstorm clouds.",
        "Strong winds inside the storm carry drops of water up to where the air is freezing.",
        "Each time a hailstone goes up and down, it gathers another layer of ice, like an onion.",
        "Most hailstones are the size of peas, but some can be as large as an orange.",
    ),
}

# job, what they do, where they work, what they need
JOBS: tuple[tuple[str, str, str, str], ...] = (
    ("baker", "makes bread, cakes and pastries", "a bakery", "flour, an oven and an early start to the day"),
    ("farmer", "grows crops and raises animals", "a farm", "good soil, rain and a lot of patience"),
    (
        "nurse",
        "takes care of people who are sick or hurt",
        "a hospital or a clinic",
        "kindness, knowledge and steady hands",
    ),
    (
        "firefighter",
        "puts out fires and rescues people",
        "a fire station",
        "a fire engine, hoses and courage",
    ),
    (
        "librarian",
        "looks after books and helps people find information",
        "a library",
        "a good memory and a love of reading",
    ),
    (
        "carpenter",
        "builds and repairs things made of wood",
        "a workshop",
        "saws, hammers and careful measuring",
    ),
    ("pilot", "flies airplanes", "an airport and the sky", "years of training and clear thinking"),
    (
        "teacher",
        "helps children learn to read, write and understand the world",
        "a school",
        "patience and good explanations",
    ),
    ("fisher", "catches fish in rivers and the sea", "a boat", "nets, a weather eye and an early start"),
    (
        "gardener",
        "plants and cares for flowers, trees and lawns",
        "parks and gardens",
        "spades, seeds and a watering can",
    ),
    ("mail carrier", "delivers letters and parcels", "the streets of a town", "a bag, a map and good shoes"),
    (
        "vet",
        "treats animals that are ill or injured",
        "an animal clinic",
        "gentle hands and medical knowledge",
    ),
    (
        "potter",
        "shapes clay into bowls, cups and vases",
        "a studio with a wheel and a kiln",
        "wet clay and steady fingers",
    ),
    ("tailor", "makes and mends clothes", "a small shop", "needles, thread, scissors and a measuring tape"),
    (
        "beekeeper",
        "looks after bees and collects their honey",
        "a field of hives",
        "a veil, gloves and calm movements",
    ),
    (
        "lighthouse keeper",
        "keeps the lamp of a lighthouse shining for ships",
        "a tower by the sea",
        "a sharp eye for storms",
    ),
    (
        "blacksmith",
        "heats iron in a fire and hammers it into horseshoes, gates and tools",
        "a forge",
        "an anvil, tongs and strong arms",
    ),
    (
        "architect",
        "designs houses, schools and bridges",
        "an office full of drawings",
        "imagination and careful calculations",
    ),
    ("chef", "plans meals and cooks them in a restaurant", "a busy kitchen", "sharp knives and a good nose"),
    (
        "ranger",
        "looks after forests and the animals that live in them",
        "a national park",
        "binoculars, a map and knowledge of nature",
    ),
    (
        "dentist",
        "checks and cleans teeth and repairs holes in them",
        "a clinic",
        "small mirrors and steady hands",
    ),
    (
        "shepherd",
        "looks after a flock of sheep on the hills",
        "the open pasture",
        "a crook, a good dog and patience in all weathers",
    ),
    (
        "astronomer",
        "studies the stars, planets and galaxies",
        "an observatory",
        "telescopes, computers and late nights",
    ),
    (
        "plumber",
        "fits and repairs pipes, taps and drains",
        "houses and buildings all over town",
        "wrenches and a good sense of direction under the floor",
    ),
    (
        "bookbinder",
        "sews pages together and fixes covers onto books",
        "a quiet workshop",
        "thread, glue, leather and patience",
    ),
    (
        "zookeeper",
        "feeds the animals at the zoo and keeps their homes clean",
        "a zoo",
        "buckets of food and a love of animals",
    ),
)

# plant, description, how it grows, a use
PLANTS_INFO: tuple[tuple[str, str, str, str], ...] = (
    (
        "the sunflower",
        "a tall plant with a large yellow flower",
        "it turns its young head to follow the sun",
        "its seeds are eaten by birds and people and pressed for oil",
    ),
    (
        "the oak tree",
        "a strong tree with lobed leaves",
        "it can live for hundreds of years",
        "its acorns feed squirrels, jays and deer",
    ),
    (
        "bamboo",
        "a tall grass with hollow stems",
        "some kinds can grow almost a meter in one day",
        "it is used to build houses, fences and furniture",
    ),
    (
        "the cactus",
        "a plant with a thick stem and sharp spines",
        "it stores water in its stem for dry months",
        "it gives shade and water to desert animals",
    ),
    (
        "the apple tree",
        "a fruit tree with white and pink blossoms",
        "bees carry pollen between its flowers",
        "its fruit can be eaten fresh, baked or pressed into juice",
    ),
    (
        "the water lily",
        "a plant with round leaves that float on ponds",
        "its roots grow in the mud at the bottom",
        "frogs rest on its leaves",
    ),
    (
        "wheat",
        "a grass with heads full of grain",
        "it is sown in autumn or spring and harvested in summer",
        "its grain is ground into flour for bread",
    ),
    (
        "the pine tree",
        "an evergreen tree with needles instead of flat leaves",
        "its seeds grow inside woody cones",
        "its wood is used for building and its resin for glue",
    ),
    (
        "the rose",
        "a shrub with fragrant flowers and thorny stems",
        "it blooms from early summer into autumn",
        "its fruits, called hips, are rich in vitamins",
    ),
    (
        "moss",
        "a small soft plant without flowers",
        "it grows in damp and shady places",
        "it holds water like a sponge and protects the soil",
    ),
)

# How everyday things are made or how they work: each topic is an ordered explanation.
HOW: dict[str, tuple[str, ...]] = {
    "How bread is made": (
        "Bread is made from flour, water, salt and yeast.",
        "Yeast is a tiny living thing that feeds on the sugar in flour and gives off bubbles of gas.",
        "The baker mixes everything into a dough and kneads it until it becomes smooth and stretchy.",
        "Then the dough is left in a warm place, where the bubbles make it rise.",
        "Finally it goes into a hot oven, and the outside turns into a golden crust.",
    ),
    "How paper is made": (
        "Most paper is made from wood.",
        "The wood is cut into small chips and cooked with water until the fibers come apart.",
        "This soft, wet mixture is called pulp.",
        "The pulp is spread in a thin layer on a moving screen, and the water drains away.",
        "Heavy rollers press and dry the layer until it becomes a long sheet of paper.",
        "Old paper can be soaked and turned back into pulp, which is why recycling paper saves trees.",
    ),
    "How honey is made": (
        "Honeybees visit flowers and suck up a sweet liquid called nectar.",
        "They carry it back to the hive in a special stomach.",
        "In the hive, the bees pass the nectar from one to another and fan it with their wings.",
        "This dries it out until it becomes thick, sticky honey.",
        "The bees store the honey in wax cells and seal them, so that they have food for the winter.",
    ),
    "How glass is made": (
        "Glass is made mostly from sand.",
        "The sand is mixed with soda and lime and heated in a furnace until it melts into a glowing liquid.",
        "While it is hot and soft, the glass can be blown, pressed or rolled into shape.",
        "As it cools, it becomes hard and clear.",
        "Glass can be melted again and again, so old bottles can become new ones.",
    ),
    "How cheese is made": (
        "Cheese is made from milk.",
        "The milk is warmed, and a little culture is added to make it slightly sour.",
        "Then the milk thickens and separates into soft lumps called curds and a watery liquid called whey.",
        "The curds are cut, drained and pressed into molds.",
        "Many cheeses are then left to age in cool cellars for weeks or even years, which gives them "
        "their flavor.",
    ),
    "How a bicycle works": (
        "A bicycle turns the push of your legs into movement.",
        "When you press the pedals, they turn a large gear wheel.",
        "A chain carries that movement to a smaller gear on the back wheel.",
        "Because the back gear is smaller, the wheel turns faster than the pedals.",
        "Brakes squeeze the wheels to slow them down, and the handlebars let you steer.",
    ),
    "Why a boat floats": (
        "A boat floats because it pushes water out of the way.",
        "The water pushes back with a force that holds the boat up.",
        "A heavy steel ship can float because its hollow shape pushes aside a great deal of water.",
        "If the same steel were made into a solid block, it would sink.",
        "This is why a ball of clay sinks, but the same clay shaped like a bowl can float.",
    ),
    "How a seed grows": (
        "A seed holds a tiny baby plant and a store of food.",
        "When the soil is warm and damp, the seed soaks up water and swells.",
        "First a root pushes down into the soil to find water.",
        "Then a shoot pushes up toward the light and opens its first leaves.",
        "Once it has leaves, the young plant can make its own food from sunlight.",
    ),
    "How wool becomes a sweater": (
        "Every spring, farmers shear the thick coats of their sheep.",
        "The wool is washed to remove dirt and grease, then combed so that the fibers lie straight.",
        "Next it is spun, which means the fibers are twisted together into a long strong yarn.",
        "The yarn can be dyed in bright colors.",
        "Finally it is knitted, loop by loop, into a warm sweater.",
    ),
}

# The body and the sky: more ordered explanations, for a broader everyday vocabulary.
HOW.update(
    {
        "How the heart works": (
            "The heart is a strong muscle about the size of a fist.",
            "It pumps blood through tubes called blood vessels to every part of the body.",
            "Blood carries oxygen from the lungs and nutrients from digested food to the muscles and organs.",
            "The heart has four chambers, and valves inside it stop the blood from flowing backward.",
            "When you run or climb, your heart beats faster to deliver more oxygen.",
            "A doctor listens to the heart with a tool called a stethoscope.",
        ),
        "How we breathe": (
            "When you breathe in, a sheet of muscle below the lungs, called the diaphragm, moves down.",
            "Air rushes in through the nose or mouth and travels down the windpipe into the lungs.",
            "Inside the lungs are millions of tiny air sacs surrounded by blood vessels.",
            "Oxygen passes from the air sacs into the blood, and carbon dioxide passes out.",
            "When you breathe out, the diaphragm relaxes and the used air is pushed out again.",
        ),
        "Bones and muscles": (
            "An adult skeleton has about two hundred bones.",
            "Bones hold the body up, protect soft organs like the brain, and make new blood cells.",
            "Where two bones meet there is a joint, such as the knee, the elbow or the shoulder.",
            "Muscles are attached to bones by tough cords called tendons.",
            "Muscles can only pull, never push, so they work in pairs: one bends a joint and the other "
            "straightens it.",
            "Exercise, sleep and food rich in calcium help bones and muscles stay strong.",
        ),
        "Our teeth": (
            "Children have twenty baby teeth, which are slowly replaced by adult teeth.",
            "Sharp front teeth called incisors bite and cut food.",
            "Pointed canine teeth grip and tear, and wide back teeth called molars grind food into small "
            "pieces.",
            "Each tooth is covered in enamel, the hardest substance in the human body.",
            "Brushing twice a day removes the sticky film that can cause holes in the teeth.",
        ),
        "The planets": (
            "Eight planets travel around the sun.",
            "Mercury is the closest to the sun and the smallest of the eight.",
            "Venus is covered in thick clouds and is the hottest planet.",
            "Earth is the only planet known to have oceans of liquid water and living things.",
            "Mars is a cold, dusty world that looks red because of rusty iron in its soil.",
            "Jupiter is the largest planet, a giant ball of gas with a storm bigger than the Earth.",
            "Saturn is famous for its bright rings of ice and rock.",
            "Uranus and Neptune are icy giants far from the sun, and a year on Neptune lasts about 165 Earth "
            "years.",
        ),
        "The sun and the stars": (
            "The sun is a star, a huge glowing ball of hot gas.",
            "It looks bigger and brighter than other stars only because it is much closer to us.",
            "Light from the sun takes about eight minutes to reach the Earth.",
            "At night we can see thousands of other stars, and many of them are bigger than the sun.",
            "Long ago, people joined the stars into pictures called constellations and used them to find "
            "their way.",
        ),
    }
)

HOW.update(
    {
        "Why the moon changes shape": (
            "The moon does not make its own light; it shines because sunlight falls on it.",
            "As the moon travels around the Earth, we see different amounts of its sunlit side.",
            "When the sunlit side faces away from us, the moon is almost invisible, and we call it a new "
            "moon.",
            "Night by night, a thin crescent grows into a half moon and then into a bright full moon.",
            "Then it shrinks again, and the whole cycle takes about four weeks.",
        ),
        "How a volcano erupts": (
            "Deep under the ground, the rock is so hot that some of it melts into a thick liquid called "
            "magma.",
            "Magma is lighter than the solid rock around it, so it slowly rises.",
            "Gas trapped inside the magma pushes harder and harder, like the fizz in a shaken bottle.",
            "When the pressure becomes too great, the magma bursts out through an opening in the ground.",
            "Once it reaches the surface, the magma is called lava, and it cools into new rock.",
            "Over many eruptions, layers of rock and ash build up into a mountain.",
        ),
        "How soap cleans": (
            "Water alone cannot wash away grease, because oil and water do not mix.",
            "Soap is made of tiny particles with two different ends.",
            "One end is attracted to water, and the other end is attracted to oil and dirt.",
            "When you scrub, the soap surrounds little drops of grease and lifts them away from your skin.",
            "Then the water can rinse the grease down the drain.",
        ),
        "How butter is made": (
            "Butter is made from cream, the rich part of milk that rises to the top.",
            "The cream is shaken or stirred for a long time in a container called a churn.",
            "Slowly, the tiny drops of fat in the cream bump together and stick into yellow lumps.",
            "The liquid left behind is called buttermilk, and it is poured off.",
            "The butter is then washed in cold water, salted and pressed into blocks.",
        ),
        "How a kite flies": (
            "A kite flies because the wind pushes against its tilted surface.",
            "The string holds the kite at an angle, so the moving air is pushed downward.",
            "As the air is pushed down, the kite is pushed up.",
            "The tail keeps the kite steady and stops it from spinning.",
            "On a day with no wind, you have to run to make your own breeze.",
        ),
    }
)

# instrument, family, how it makes its sound
INSTRUMENTS: tuple[tuple[str, str, str], ...] = (
    ("violin", "strings", "a bow strung with horsehair is drawn across four strings"),
    (
        "cello",
        "strings",
        "the player sits and draws a bow across its thick strings, giving a deep, warm tone",
    ),
    ("harp", "strings", "the player plucks dozens of strings with the fingers"),
    ("flute", "woodwind", "the player blows across a hole near one end, like blowing across a bottle"),
    ("clarinet", "woodwind", "a thin reed vibrates against the mouthpiece when the player blows"),
    ("trumpet", "brass", "the player buzzes the lips into a cup-shaped mouthpiece and presses three valves"),
    ("trombone", "brass", "the player changes the note by sliding a long tube in and out"),
    ("drum", "percussion", "a tight skin is struck with sticks or hands"),
    ("xylophone", "percussion", "wooden bars of different lengths are struck with small hammers"),
    ("piano", "keyboard", "pressing a key makes a felt hammer strike a string inside the case"),
)

MORE_ANIMALS: tuple[tuple[str, str, str, str, str, str, str], ...] = (
    (
        "wolf",
        "wolves",
        "mammal",
        "forests, mountains and cold plains",
        "deer, rabbits and other animals",
        "a strong sense of smell and a howl that can be heard far away",
        "Wolves live and hunt in family groups called packs.",
    ),
    (
        "fox",
        "foxes",
        "mammal",
        "woods, fields and even towns",
        "mice, rabbits, insects, berries and scraps",
        "large ears that can hear a mouse moving under the snow",
        "A fox often makes its home, called a den, in a hole in the ground.",
    ),
    (
        "seal",
        "seals",
        "mammal",
        "cold coasts and icy seas",
        "fish and squid",
        "a smooth body and flippers that make it a fast swimmer",
        "Seals often rest on rocks and beaches between their fishing trips.",
    ),
    (
        "flamingo",
        "flamingos",
        "bird",
        "shallow salty lakes and lagoons",
        "tiny shrimp and algae",
        "long thin legs and a bent beak that strains food from the water",
        "Flamingos are pink because of the color in the food they eat.",
    ),
    (
        "tortoise",
        "tortoises",
        "reptile",
        "dry grasslands and warm forests",
        "grass, leaves and flowers",
        "a high domed shell that it can pull its head and legs into",
        "Some tortoises live for more than a hundred years.",
    ),
    (
        "ladybird",
        "ladybirds",
        "insect",
        "gardens, meadows and hedges",
        "tiny insects called aphids",
        "a round red or yellow shell with black spots",
        "Gardeners like ladybirds because they eat the insects that harm plants.",
    ),
    (
        "shark",
        "sharks",
        "fish",
        "oceans all over the world",
        "fish, seals and other sea animals",
        "rows of teeth that are replaced whenever one falls out",
        "Sharks have no bones; their skeletons are made of the same material as your ears.",
    ),
    (
        "panda",
        "pandas",
        "mammal",
        "the misty mountain forests of China",
        "bamboo",
        "a black and white coat and a special wrist bone that works like a thumb",
        "A panda spends most of the day eating, because bamboo gives it very little energy.",
    ),
    (
        "chameleon",
        "chameleons",
        "reptile",
        "warm forests",
        "insects",
        "eyes that can look in two directions at once and a very long sticky tongue",
        "Chameleons change color, partly to show their mood and partly to control their temperature.",
    ),
    (
        "mole",
        "moles",
        "mammal",
        "tunnels under fields and gardens",
        "earthworms and grubs",
        "wide front paws shaped like shovels",
        "Molehills are the piles of soil that a mole pushes up while it digs.",
    ),
    (
        "goose",
        "geese",
        "bird",
        "lakes, rivers and wet fields",
        "grass, grain and water plants",
        "a loud honking call",
        "Many geese fly in a V shape when they travel long distances.",
    ),
    (
        "starfish",
        "starfish",
        "sea creature",
        "rocky shores and the sea floor",
        "clams, mussels and snails",
        "five arms, and the power to grow a new arm if one is lost",
        "A starfish moves on hundreds of tiny tube feet under its arms.",
    ),
)

TOWN_START = _words(
    "Ash|Bar|Bell|Black|Bram|Brook|Clay|Cold|Crow|Dun|East|Elm|Fair|Fox|Glen|Green|Hart|Hay|High|Holl|"
    "Kings|Lang|Lark|Long|Mill|Moss|North|Oak|Pine|Red|Rose|Salt|Sand|South|Stone|Thorn|West|White|Wil|Wood"
)
TOWN_END = _words(
    "bury|by|dale|den|field|ford|gate|ham|haven|hill|holm|hurst|ley|mere|mouth|port|stead|ton|wick"
)
RIVER_NAMES = _words("Alder|Brill|Corra|Dove|Esk|Fenn|Lune|Mara|Orrin|Penna|Sorrel|Tams|Vell|Wenn|Yarrow")
FOUNDERS = _words(
    "farmers who cleared the forest|fishermen who sheltered in the bay|monks who built a small chapel|"
    "wool merchants who traded along the river|miners who came looking for tin|"
    "shepherds who brought their flocks to the summer pastures|a family of millers|"
    "traders who crossed the river at a shallow ford"
)
PRODUCTS = _words(
    "cheese|wool|pottery|apples|boats|bells|lace|clocks|glass|paper|rope|baskets|honey|cider|blankets"
)
SIGHTS = _words(
    "a stone bridge with seven arches|a market hall with a painted ceiling|a clock tower in the main square|"
    "a white lighthouse on the headland|an old windmill|a library with a copper roof|"
    "the ruins of a castle on the hill|a botanical garden|a small museum of local history|"
    "a harbor full of colorful boats"
)
FESTIVALS = _words(
    "a lantern festival|a harvest fair|a boat race|a cheese market|a music festival|a kite festival|"
    "an apple festival|a flower parade"
)
MONTHS = _words("January|February|March|April|May|June|July|August|September|October|November|December")
EVENTS = _words(
    "a great flood covered the lower streets, and afterwards the people built a high wall along the river|"
    "a fire destroyed many wooden houses, and the town was rebuilt in stone|"
    "the first school opened in an old barn|the railway reached the town, and visitors began to arrive|"
    "a new road was built over the hills|the old harbor was made deeper so that larger ships could enter|"
    "a hard winter froze the river for two months|the town hall was finished after twelve years of work|"
    "a public library opened with three hundred books|a new bridge replaced the old ferry"
)


def _animal_doc(r: Rand) -> str:
    """An encyclopedia-style entry on one animal, or a short comparison of two or three."""
    chosen = r.picks(ANIMALS + MORE_ANIMALS, r.pick((1, 1, 2, 3)))
    paras = []
    for name, plural, cls, habitat, diet, feature, extra in chosen:
        art = _a(name)
        first = r.pick(
            (
                f"{_cap(art)} is {_a(cls)} that lives in {habitat}.",
                f"{_cap(plural)} are found in {habitat}.",
                f"The {name} makes its home in {habitat}.",
            )
        )
        eats = r.pick(
            (
                f"It eats {diet}.",
                f"Its food is mostly {diet}.",
                f"{_cap(plural)} feed on {diet}.",
            )
        )
        feat = r.pick(
            (
                f"One special thing about the {name} is that it has {feature}.",
                f"The {name} has {feature}.",
                f"You can recognize {art} by {feature}.",
            )
        )
        sentences = [first, eats, feat, CLASS_FACTS[cls].format(name=name, plural=plural), extra]
        head = sentences[:1]
        rest = sentences[1:]
        r.shuffle(rest)
        paras.append(" ".join(head + rest))
    if len(chosen) == 1:
        title = _cap(chosen[0][1])
    else:
        title = " and ".join(_cap(c[1]) for c in chosen)
        paras.append(
            r.pick(
                (
                    "Although these animals look very different, each one is well suited to the place "
                    "where it lives.",
                    "Each of these animals has found its own way to find food and stay safe.",
                    "Scientists study animals like these to learn how living things adapt to their homes.",
                )
            )
        )
    return f"{title}\n\n" + "\n\n".join(paras) + "\n"


def _tool_doc(r: Rand) -> str:
    """Short explanations of two to four tools."""
    paras = []
    for name, use, made, tip in r.picks(TOOLS, r.between(2, 4)):
        paras.append(
            " ".join(
                (
                    r.pick(
                        (
                            f"{_cap(_a(name))} is a tool for {use}.",
                            f"People use {_a(name)} for {use}.",
                            f"The {name} is used for {use}.",
                        )
                    ),
                    r.pick((f"It is made of {made}.", f"It has {made}.", f"A typical {name} has {made}.")),
                    tip,
                )
            )
        )
    intro = r.pick(
        (
            "Tools help people do work that would be hard or impossible with bare hands.",
            "Every workshop, kitchen and garden has its own tools.",
            "Long before machines, people made simple tools from stone, wood and bone.",
        )
    )
    return "Useful tools\n\n" + intro + "\n\n" + "\n\n".join(paras) + "\n"


def _weather_doc(r: Rand) -> str:
    """One or two weather topics, each a run of facts kept in order so that the explanation flows."""
    paras = []
    topics = r.picks(tuple(WEATHER), r.pick((1, 2)))
    for topic in topics:
        facts = WEATHER[topic]
        keep = [f for i, f in enumerate(facts) if i < 2 or r.chance(0.75)]
        paras.append(" ".join(keep))
    tail = r.pick(
        (
            "Weather changes every day, but by watching the sky carefully, you can learn to guess what "
            "will come next.",
            "People who study the weather are called meteorologists.",
            "",
        )
    )
    text = " and ".join(topics) + "\n\n" + "\n\n".join(paras)
    return text + (f"\n\n{tail}" if tail else "") + "\n"


def _jobs_doc(r: Rand) -> str:
    """What a few people do for work."""
    paras = []
    for job, does, where, needs in r.picks(JOBS, r.between(2, 4)):
        paras.append(
            r.pick(
                (
                    f"{_cap(_a(job))} {does}. Most work in {where}, and they need {needs}.",
                    f"A {job}'s work is done in {where}. {_cap(_a(job))} {does}, and the job takes {needs}.",
                    f"Have you ever met {_a(job)}? {_cap(_a(job))} {does}. It takes {needs}.",
                )
            )
        )
    return "People at work\n\n" + "\n\n".join(paras) + "\n"


def _plants_doc(r: Rand) -> str:
    """A few plants: what they look like, how they grow, what they are good for."""
    paras = []
    for name, what, grows, use in r.picks(PLANTS_INFO, r.between(2, 3)):
        paras.append(
            f"{_cap(name)} is {what}. "
            + r.pick((f"Interestingly, {grows}.", f"{_cap(grows)}."))
            + " "
            + r.pick((f"It is useful because {use}.", f"Also, {use}.", f"{_cap(use)}."))
        )
    intro = r.pick(
        (
            "Plants make their own food from sunlight, water and air.",
            "Almost every living thing depends on plants in one way or another.",
        )
    )
    return "Plants around us\n\n" + intro + "\n\n" + "\n\n".join(paras) + "\n"


def _town_doc(r: Rand) -> str:
    """An invented town with a short chronicle: names and dates are made up, the style is encyclopedic."""
    start, end = r.pick(TOWN_START), r.pick(TOWN_END)
    town = start + (end[1:] if start[-1] == end[0] else end)  # "Easton", not "Eastton"
    river = f"the River {r.pick(RIVER_NAMES)}"
    founded = r.between(900, 1500)
    years = sorted(founded + r.between(50, 900) for _ in range(r.between(2, 4)))
    people = r.between(8, 450) * 100
    first = (
        f"{town} is {_a(r.pick(('small', 'busy', 'quiet', 'old', 'pretty')))} "
        f"{r.pick(('town', 'market town', 'port', 'village'))} on {river}, "
        f"with about {people:,} inhabitants. It is known for its {r.pick(PRODUCTS)} and for {r.pick(SIGHTS)}."
    )
    history = [f"The first settlement was founded around the year {founded} by {r.pick(FOUNDERS)}."]
    for year, event in zip(years, r.picks(EVENTS, len(years)), strict=True):
        history.append(f"In {year}, {event}.")
    today = (
        f"Today, visitors come in {r.pick(MONTHS)} for {r.pick(FESTIVALS)}, and in {r.pick(MONTHS)} "
        f"the {r.pick(PRODUCTS)} market fills the square."
    )
    return f"{town}\n\n{first}\n\nHistory. " + " ".join(history) + f"\n\n{today}\n"


def _how_doc(r: Rand) -> str:
    """An ordered explanation of how something is made or works."""
    title = r.pick(tuple(HOW))
    facts = list(HOW[title])
    intro = r.pick(
        (
            "Have you ever wondered about this? Here is the answer, step by step.",
            "It is something we see every day, but few people know the whole story.",
            "",
        )
    )
    body = " ".join(facts[:1] + [f for f in facts[1:] if r.chance(0.85)])
    return f"{title}\n\n" + (f"{intro}\n\n" if intro else "") + body + "\n"


def _music_doc(r: Rand) -> str:
    """A few musical instruments and how each makes its sound."""
    chosen = r.picks(INSTRUMENTS, r.between(3, 5))
    paras = [
        r.pick(
            (
                f"The {name} belongs to the {family} family. To play it, {how}.",
                f"In the {family} section you may find the {name}: {how}.",
                f"On the {name}, {how}. It is a member of the {family} family.",
            )
        )
        for name, family, how in chosen
    ]
    intro = r.pick(
        (
            "An orchestra groups its instruments into families by the way they make sound.",
            "Every musical sound is made by something that shakes back and forth very quickly.",
        )
    )
    return "Instruments and their sounds\n\n" + intro + "\n\n" + "\n\n".join(paras) + "\n"


LETTER_TABLES: dict[str, tuple[str, ...]] = {
    "game": _words(
        "tag|hopscotch|marbles|football|checkers|hide and seek|catch|skittles|charades|dominoes|"
        "leapfrog|tug of war|musical chairs|snakes and ladders|cards|badminton|croquet"
    ),
    "fruit": _words(
        "plums|peaches|raspberries|gooseberries|figs|melon|mango|blackberries|apricots|tangerines|"
        "kiwis|bananas|pineapple|cranberries|rhubarb|damsons"
    ),
    "vegetable": _words(
        "beans|lettuce|spinach|beetroot|turnips|cauliflower|broccoli|courgettes|parsnips|celery|"
        "radishes|sweetcorn|cabbage|garlic|asparagus"
    ),
    "subject": _words(
        "reading|drawing|music|history|geography|science|sport|painting|singing|nature study|"
        "handwriting|cooking"
    ),
    "weekday": _words("Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"),
    "pet": _words("cat|dog|goldfish|hamster|tortoise|rabbit|budgie|guinea pig|kitten|puppy|parrot"),
    "pet_name": _words(
        "Biscuit|Pepper|Muffin|Ginger|Pickle|Noodle|Socks|Button|Maple|Pebble|Toffee|Clover|Sunny|Bramble"
    ),
}

LETTER_LINES = (
    "On {weekday} we went to {where}, and it was wonderful.",
    "At school we are learning about {subject}, which is my favorite lesson now.",
    "Our {pet}, {pet_name}, has learned a new trick. {pet_name} can now {trick}.",
    "Yesterday we played {game} with the children from next door, and I won twice.",
    "Grandpa's garden is full of {vegetable} and {vegetable2} this year.",
    "We picked {fruit} until our fingers were purple, and then we made a pie.",
    "I saw {a_bird} {bird_doing}. I wish you could have seen it too.",
    "The weather here has been {weather_word}, so we stayed inside and played {game}.",
    "I have been reading a book about {topic}, and I have learned many new things.",
    "There is a new {building_noun} on our street, and everybody is talking about it.",
    "My {elder} says that if it stays dry, we can go camping by the {landform} next month.",
    "I am saving my pocket money to buy {a_obj}.",
    "We had {food} for dinner, and I helped to make it.",
    "On the way home we passed {building}, and the air smelled of {smell}.",
    "I have planted {flower} by the front door. I hope they come up in spring.",
    "I learned to play a little tune on the {instrument}. It is harder than it looks.",
    "Last night there was a storm, and we counted the seconds between the lightning and the thunder.",
    "The river was so high after the rain that the ducks were swimming in the field.",
)

LETTER_EXTRA: dict[str, tuple[str, ...]] = {
    "trick": _words(
        "sit and wait|roll over|fetch a ball|open the door with its nose|shake hands|ring a bell"
    ),
    "weather_word": _words("rainy|windy|foggy|very hot|cold and gray|snowy|stormy|changeable"),
    "topic": _words("volcanoes|the moon and the stars|dinosaurs|the deep sea|castles|bees|old ships|deserts"),
    "building_noun": _words("bakery|playground|library|swimming pool|bookshop|cafe|bicycle shop|garden"),
}


def _letter_doc(r: Rand) -> str:
    """A child's letter home: first-person everyday news, built from the same broad tables."""
    c = _story_context(r, r.pick(tuple(PLOTS)))
    slots = dict(c)
    for tables in (DETAIL_TABLES, LETTER_TABLES, LETTER_EXTRA):
        for key, table in tables.items():
            first, second = r.picks(table, 2)
            slots[key], slots[key + "2"], slots["a_" + key] = first, second, _a(first)
    lines = [line.format(**slots) for line in r.picks(LETTER_LINES, r.between(4, 7))]
    opener = r.pick(
        (
            "How are you? I hope you are well.",
            "Thank you for your last letter. It made me very happy.",
            "I am writing to tell you all our news.",
        )
    )
    closer = r.pick(
        (
            "Please write back soon and tell me all your news.",
            "I cannot wait to see you in the holidays.",
            "Give my love to everyone.",
        )
    )
    sign = r.pick(("Love", "With love", "Lots of love", "Your friend", "Best wishes"))
    mid = len(lines) // 2
    body = " ".join(lines[:mid]) + "\n\n" + " ".join(lines[mid:])
    return f"Dear {_cap(c['elder2'])},\n\n{opener}\n\n{body}\n\n{closer}\n\n{sign},\n{c['Name']}\n"


EXPOSITORY = (
    _animal_doc,
    _animal_doc,
    _tool_doc,
    _weather_doc,
    _jobs_doc,
    _plants_doc,
    _town_doc,
    _town_doc,
    _how_doc,
    _music_doc,
    _letter_doc,
    _letter_doc,
)


def document(r: Rand) -> str:
    """One document: a story most of the time, otherwise an expository text."""
    return story(r) if r.chance(0.6) else r.pick(EXPOSITORY)(r)


def documents(r: Rand) -> Iterator[str]:
    """An endless stream of public-domain documents."""
    while True:
        yield document(r)


def generate(seed: int, budget: int) -> Iterator[str]:
    """Distinct public-domain documents until about ``budget`` bytes of UTF-8 text."""
    return until_budget(documents(Rand(seed)), budget)
