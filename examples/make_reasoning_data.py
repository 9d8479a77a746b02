"""Generate the bundled synthetic reasoning data set (examples/data/reasoning.jsonl).

Each line is one example in the schema of the seed recipe's data set
(medical-o1-reasoning-SFT): {"Question", "Complex_CoT", "Response"}. The examples are
medical-flavoured and arithmetic word problems with short chains of thought. The templates are
few enough that a tiny model learns their shape within a few hundred steps, while the drawn
numbers, names and findings keep the answers from being memorised, so the loss falls visibly
but not to zero.

The output is deterministic for a given seed:

    python examples/make_reasoning_data.py --count 400 --seed 0 --out examples/data/reasoning.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Example = dict[str, str]

NAMES = [
    "Maria", "James", "Aisha", "Tom", "Lena", "Omar", "Sofia", "Daniel", "Priya", "Lucas",
    "Grace", "Mateo", "Hana", "Noah", "Zara", "Ethan", "Chloe", "Ravi", "Emma", "Samuel",
]

OPENINGS = [
    "Okay, let's work through this.",
    "Alright, let me think about this step by step.",
    "Let me start with what the question gives me.",
    "Hmm, let's break this down.",
    "First, I should figure out what is being asked.",
]

CHECKS = [
    "Let me double-check that.",
    "Just to be sure, I'll check the numbers again.",
    "Let me go over this once more.",
    "Quick check before I answer.",
]


def _money(amount: float) -> str:
    if amount == int(amount):
        return f"${int(amount)}"
    return f"${amount:.2f}"


def _number(value: float, decimals: int = 1) -> str:
    rounded = round(value, decimals)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.{decimals}f}"


def shopping_change(rng: random.Random) -> Example:
    name = rng.choice(NAMES)
    item_a, item_b = rng.sample(
        ["notebooks", "pens", "apples", "oranges", "loaves of bread", "bottles of water",
         "bandages", "pencils", "candles", "cups of tea"], 2)
    count_a, count_b = rng.randint(2, 9), rng.randint(2, 9)
    price_a, price_b = rng.randint(1, 6), rng.choice([0.5, 1, 1.5, 2, 2.5, 3])
    cost_a, cost_b = count_a * price_a, count_b * price_b
    total = cost_a + cost_b
    bill = next(b for b in (10, 20, 50, 100) if b >= total + 1)
    change = bill - total
    question = (
        f"{name} buys {count_a} {item_a} at {_money(price_a)} each and {count_b} {item_b} at "
        f"{_money(price_b)} each. {name} pays with a {_money(bill)} bill. How much change "
        f"should {name} get back?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} The {item_a} cost {count_a} times {_money(price_a)}, which is "
        f"{_money(cost_a)}. The {item_b} cost {count_b} times {_money(price_b)}, which is "
        f"{_money(cost_b)}. So the total is {_money(cost_a)} plus {_money(cost_b)}, that's "
        f"{_money(total)}. {name} hands over {_money(bill)}, so the change is {_money(bill)} "
        f"minus {_money(total)}, which is {_money(change)}. {rng.choice(CHECKS)} "
        f"{_money(total)} plus {_money(change)} gives back {_money(bill)}. Yes, that works."
    )
    response = (
        f"The purchase costs {_money(total)} in total, so {name} should get {_money(change)} "
        f"in change."
    )
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def travel_distance(rng: random.Random) -> Example:
    name = rng.choice(NAMES)
    vehicle = rng.choice(["car", "train", "bus", "bicycle", "ambulance"])
    speed = rng.choice([12, 15, 18, 20, 24, 30, 40, 45, 48, 50, 60, 72, 80, 90])
    minutes = rng.choice([30, 45, 90, 120, 150, 20, 40, 100])
    hours = minutes / 60
    distance = speed * hours
    if rng.random() < 0.5:
        question = (
            f"{name} travels by {vehicle} at a steady {speed} km per hour for {minutes} minutes. "
            f"How far does {name} travel?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} The speed is given per hour but the time is in minutes, so "
            f"I need to convert first. {minutes} minutes is {minutes} divided by 60, which is "
            f"{_number(hours, 2)} hours. Distance is speed times time, so {speed} times "
            f"{_number(hours, 2)} gives {_number(distance)} km. {rng.choice(CHECKS)} In one hour "
            f"the {vehicle} covers {speed} km, and {_number(hours, 2)} hours is "
            f"{'more' if hours > 1 else 'less'} than an hour, so {_number(distance)} km makes sense."
        )
        response = f"{name} travels {_number(distance)} km."
    else:
        question = (
            f"A {vehicle} needs to cover {_number(distance)} km at an average speed of {speed} km "
            f"per hour. How many minutes will the trip take?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} Time is distance divided by speed. {_number(distance)} divided "
            f"by {speed} is {_number(hours, 2)} hours. The question wants minutes, so I multiply "
            f"by 60: {_number(hours, 2)} times 60 is {minutes} minutes. {rng.choice(CHECKS)} At "
            f"{speed} km per hour, {minutes} minutes covers {speed} times {minutes} over 60, which "
            f"is {_number(distance)} km. That matches."
        )
        response = f"The trip takes {minutes} minutes."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def sharing_remainder(rng: random.Random) -> Example:
    name = rng.choice(NAMES)
    thing = rng.choice(["apples", "stickers", "biscuits", "marbles", "vitamin tablets", "cards"])
    people = rng.randint(3, 9)
    each = rng.randint(3, 12)
    left = rng.randint(0, people - 1)
    total = people * each + left
    question = (
        f"{name} has {total} {thing} and shares them equally among {people} friends, giving each "
        f"friend as many as possible. How many does each friend get, and how many are left over?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} I need to divide {total} by {people}. {people} times {each} is "
        f"{people * each}, and {people} times {each + 1} is {people * (each + 1)}, which is too "
        f"many. So each friend gets {each}. The leftover is {total} minus {people * each}, which "
        f"is {left}. {rng.choice(CHECKS)} {people} times {each} plus {left} is {total}. Good."
    )
    if left == 0:
        response = f"Each friend gets {each} {thing}, and none are left over."
    else:
        response = f"Each friend gets {each} {thing}, and {left} are left over."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def percent_discount(rng: random.Random) -> Example:
    item = rng.choice(["jacket", "blood pressure monitor", "pair of shoes", "lamp", "backpack",
                       "thermometer", "bicycle helmet", "kettle"])
    price = rng.choice([20, 40, 50, 60, 80, 120, 150, 200, 250])
    percent = rng.choice([10, 15, 20, 25, 30, 40, 50])
    discount = price * percent / 100
    final = price - discount
    question = (
        f"A {item} normally costs {_money(price)}. The shop offers {percent}% off. What is the "
        f"sale price?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} {percent}% of {_money(price)} is {percent} over 100 times "
        f"{price}. That's {_money(discount)}. Taking the discount away from the normal price gives "
        f"{_money(price)} minus {_money(discount)}, which is {_money(final)}. "
        f"{rng.choice(CHECKS)} Paying {100 - percent}% of {_money(price)} should give the same "
        f"thing, and {100 - percent}% of {price} is {_money(final)}. It matches."
    )
    response = f"The sale price of the {item} is {_money(final)}."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def age_difference(rng: random.Random) -> Example:
    older, younger = rng.sample(NAMES, 2)
    younger_age = rng.randint(4, 40)
    gap = rng.randint(2, 15)
    older_age = younger_age + gap
    total = older_age + younger_age
    question = (
        f"{older} is {gap} years older than {younger}. Together their ages add up to {total}. "
        f"How old is {younger}?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} If I take away the {gap} extra years from the total, what's left "
        f"is twice {younger}'s age. {total} minus {gap} is {total - gap}. Half of {total - gap} "
        f"is {younger_age}. So {younger} is {younger_age} and {older} is {younger_age} plus {gap}, "
        f"which is {older_age}. {rng.choice(CHECKS)} {younger_age} plus {older_age} is {total}, "
        f"and the difference is {gap}. Both conditions hold."
    )
    response = f"{younger} is {younger_age} years old (and {older} is {older_age})."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def production_rate(rng: random.Random) -> Example:
    place = rng.choice(["factory", "bakery", "pharmacy", "laboratory", "print shop"])
    product = {"factory": "boxes", "bakery": "loaves", "pharmacy": "prescriptions",
               "laboratory": "blood samples", "print shop": "posters"}[place]
    per_hour = rng.randint(6, 48)
    hours = rng.randint(2, 9)
    days = rng.randint(2, 6)
    per_day = per_hour * hours
    total = per_day * days
    question = (
        f"A {place} handles {per_hour} {product} per hour and works {hours} hours a day. How many "
        f"{product} does it handle in {days} days?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} In one day it works {hours} hours at {per_hour} per hour, so "
        f"that's {per_hour} times {hours}, which is {per_day} {product} a day. Over {days} days "
        f"it is {per_day} times {days}, which is {total}. {rng.choice(CHECKS)} {per_hour} times "
        f"{hours * days} total hours is also {total}. Same answer."
    )
    response = f"The {place} handles {total} {product} in {days} days."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


DRUGS_PER_DAY = [
    ("amoxicillin", [40, 45, 50, 80, 90]),
    ("cefalexin", [25, 50]),
    ("azithromycin", [10]),
    ("ibuprofen", [20, 30, 40]),
    ("clarithromycin", [15]),
]


def weight_based_dose(rng: random.Random) -> Example:
    drug, doses_per_kg = rng.choice(DRUGS_PER_DAY)
    mg_per_kg = rng.choice(doses_per_kg)
    weight = rng.randint(8, 36)
    divided = rng.choice([1, 2, 3, 4])
    daily = mg_per_kg * weight
    per_dose = daily / divided
    patient = rng.choice(["child", "toddler", "young patient", "boy", "girl"])
    times = {1: "once a day", 2: "in two doses", 3: "in three doses", 4: "in four doses"}[divided]
    question = (
        f"A {patient} weighing {weight} kg is prescribed {drug} at {mg_per_kg} mg/kg per day, "
        f"given {times}. How many milligrams should be given per dose?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} The dose is based on body weight, so the daily amount is "
        f"{mg_per_kg} mg times {weight} kg. That's {daily} mg per day. The daily amount is given "
        f"{times}, so each dose is {daily} divided by {divided}, which is {_number(per_dose)} mg. "
        f"{rng.choice(CHECKS)} {_number(per_dose)} mg times {divided} is {daily} mg, and {daily} "
        f"over {weight} kg is {mg_per_kg} mg/kg. That's consistent with the prescription."
    )
    response = (
        f"The daily dose is {daily} mg ({mg_per_kg} mg/kg x {weight} kg), so each dose is "
        f"{_number(per_dose)} mg."
    )
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def tablets_needed(rng: random.Random) -> Example:
    drug, strength = rng.choice([
        ("metformin", 500), ("paracetamol", 500), ("atenolol", 25), ("furosemide", 40),
        ("prednisolone", 5), ("amlodipine", 5), ("levothyroxine", 25), ("aspirin", 75),
    ])
    count = rng.choice([0.5, 1, 1.5, 2, 3, 4])
    ordered = strength * count
    question = (
        f"A doctor orders {_number(ordered)} mg of {drug}. The tablets available contain "
        f"{strength} mg each. How many tablets should the nurse give?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} The number of tablets is the ordered dose divided by the strength "
        f"of one tablet. {_number(ordered)} divided by {strength} is {_number(count)}. "
        f"{rng.choice(CHECKS)} {_number(count)} tablets of {strength} mg gives "
        f"{_number(ordered)} mg, which is exactly the order."
        + (" Half a tablet means the tablet has to be scored so it can be split." if count % 1 else "")
    )
    plural = "tablet" if count == 1 else "tablets"
    response = f"The nurse should give {_number(count)} {plural} of {drug} {strength} mg."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def infusion_rate(rng: random.Random) -> Example:
    fluid = rng.choice(["normal saline", "Ringer's lactate", "5% dextrose", "Hartmann's solution"])
    hours = rng.choice([2, 4, 5, 6, 8, 10, 12])
    rate = rng.choice([50, 60, 75, 80, 100, 120, 125, 150, 200, 250])
    volume = rate * hours
    if rng.random() < 0.6:
        question = (
            f"A patient is to receive {volume} mL of {fluid} over {hours} hours. What infusion "
            f"rate in mL per hour should the pump be set to?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} The rate is the volume divided by the time. {volume} mL over "
            f"{hours} hours is {volume} divided by {hours}, which is {rate} mL per hour. "
            f"{rng.choice(CHECKS)} {rate} mL per hour for {hours} hours gives {volume} mL. Correct."
        )
        response = f"Set the pump to {rate} mL per hour."
    else:
        drop_factor = rng.choice([15, 20, 60])
        drops = rate * drop_factor / 60
        question = (
            f"{volume} mL of {fluid} must run over {hours} hours using a giving set with a drop "
            f"factor of {drop_factor} drops per mL. How many drops per minute is that?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} Start with the hourly rate: {volume} divided by {hours} is {rate} "
            f"mL per hour. Each mL is {drop_factor} drops, so that is {rate} times {drop_factor}, "
            f"which is {rate * drop_factor} drops per hour. Dividing by 60 minutes gives "
            f"{_number(drops)} drops per minute. {rng.choice(CHECKS)} The shortcut is rate times "
            f"drop factor over 60, and {rate} times {drop_factor} over 60 is {_number(drops)}."
        )
        # Drops are counted by eye, so round half up to a whole drop as a nurse would.
        response = f"The infusion should run at about {int(drops + 0.5)} drops per minute."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def body_mass_index(rng: random.Random) -> Example:
    height_cm = rng.randint(150, 195)
    weight = rng.randint(45, 120)
    height_m = height_cm / 100
    # Classify the rounded value that the text shows, so a shown 25.0 is never "normal".
    bmi = round(weight / (height_m * height_m), 1)
    if bmi < 18.5:
        band = "underweight"
    elif bmi < 25:
        band = "in the normal range"
    elif bmi < 30:
        band = "overweight"
    else:
        band = "in the obese range"
    name = rng.choice(NAMES)
    question = (
        f"{name} is {height_cm} cm tall and weighs {weight} kg. What is {name}'s body mass index, "
        f"and how is it classified?"
    )
    cot = (
        f"{rng.choice(OPENINGS)} BMI is weight in kilograms divided by height in metres squared. "
        f"The height is {_number(height_m, 2)} m, and squaring it gives "
        f"{_number(height_m * height_m, 2)}. {weight} divided by {_number(height_m * height_m, 2)} "
        f"is about {_number(bmi)}. The usual cut-offs are 18.5, 25 and 30. {_number(bmi)} is "
        f"{band}. {rng.choice(CHECKS)} Going the other way, {_number(bmi)} times "
        f"{_number(height_m * height_m, 2)} is about {_number(bmi * height_m * height_m, 0)} kg, "
        f"which matches the weight."
    )
    response = f"{name}'s BMI is about {_number(bmi)} kg/m2, which is {band}."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def fluid_balance(rng: random.Random) -> Example:
    oral = rng.randint(4, 16) * 100
    iv = rng.randint(0, 20) * 100
    urine = rng.randint(6, 25) * 100
    drain = rng.randint(0, 6) * 50
    intake = oral + iv
    output = urine + drain
    balance = intake - output
    question = (
        f"Over 24 hours a patient drinks {oral} mL and receives {iv} mL of intravenous fluid. "
        f"The urine output is {urine} mL and the wound drain collects {drain} mL. What is the "
        f"fluid balance?"
    )
    sign = "positive" if balance > 0 else "negative" if balance < 0 else "even"
    cot = (
        f"{rng.choice(OPENINGS)} Intake is {oral} plus {iv}, which is {intake} mL. Output is "
        f"{urine} plus {drain}, which is {output} mL. The balance is intake minus output: {intake} "
        f"minus {output} is {balance} mL. So the balance is {sign}. "
        + ("That means the patient has taken in more than they lost."
           if balance > 0 else "That means the patient has lost more than they took in."
           if balance < 0 else "Intake and output are equal.")
    )
    response = f"The 24-hour fluid balance is {'+' if balance > 0 else ''}{balance} mL ({sign})."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


def ecg_heart_rate(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        boxes = rng.choice([2, 2.5, 3, 4, 5, 6])
        rate = 300 / boxes
        question = (
            f"On a standard ECG the distance between two R waves is {_number(boxes)} large squares. "
            f"What is the heart rate?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} At the standard paper speed one large square is 0.2 seconds, "
            f"so 300 large squares make a minute. The rate is 300 divided by the number of large "
            f"squares between R waves: 300 divided by {_number(boxes)} is {_number(rate, 0)}."
        )
    else:
        boxes = rng.choice([10, 12, 15, 18, 20, 25, 30])
        rate = 1500 / boxes
        question = (
            f"On a standard ECG there are {boxes} small squares between two R waves. What is the "
            f"heart rate?"
        )
        cot = (
            f"{rng.choice(OPENINGS)} One small square is 0.04 seconds, so there are 1500 small "
            f"squares in a minute. The rate is 1500 divided by {boxes}, which is "
            f"{_number(rate, 0)} beats per minute."
        )
    if rate > 100:
        verdict = "a tachycardia (above 100)"
    elif rate < 60:
        verdict = "a bradycardia (below 60)"
    else:
        verdict = "within the normal range of 60 to 100"
    cot += f" Compared with the normal range of 60 to 100, that is {verdict}."
    response = f"The heart rate is about {_number(rate, 0)} beats per minute, which is {verdict}."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


LAB_TESTS = [
    # name, unit, low, high, low label, high label, draw range
    ("fasting blood glucose", "mg/dL", 70, 99, "hypoglycaemia", None, (50, 180)),
    ("serum potassium", "mmol/L", 3.5, 5.0, "hypokalaemia", "hyperkalaemia", (2.5, 6.5)),
    ("serum sodium", "mmol/L", 135, 145, "hyponatraemia", "hypernatraemia", (120, 160)),
    ("haemoglobin in an adult woman", "g/dL", 12.0, 15.5, "anaemia", "a raised haemoglobin",
     (7.0, 18.0)),
    ("TSH", "mU/L", 0.4, 4.0, "a suppressed TSH, suggesting hyperthyroidism",
     "a raised TSH, suggesting hypothyroidism", (0.05, 12.0)),
]


def lab_interpretation(rng: random.Random) -> Example:
    name, unit, low, high, low_label, high_label, (draw_low, draw_high) = rng.choice(LAB_TESTS)
    decimals = 0 if isinstance(low, int) else 1
    if name == "TSH":
        decimals = 2
    value = round(rng.uniform(draw_low, draw_high), decimals)
    shown = _number(value, decimals)
    question = f"A patient's {name} is {shown} {unit}. How should this result be interpreted?"
    cot = (
        f"{rng.choice(OPENINGS)} The usual reference range for {name} is about {low} to {high} "
        f"{unit}. The value here is {shown}. "
    )
    if name == "fasting blood glucose" and value >= 100:
        label = "diabetes" if value >= 126 else "impaired fasting glucose (prediabetes)"
        cot += (
            f"That is above {high}. For fasting glucose the cut-offs are 100 to 125 for "
            f"impaired fasting glucose and 126 or more for diabetes. {shown} falls in the "
            f"{'diabetes' if value >= 126 else 'prediabetes'} band, and the test should be "
            f"repeated on another day to confirm."
        )
        response = f"A fasting glucose of {shown} {unit} is consistent with {label}."
    elif value < low:
        cot += f"That is below the lower limit of {low}, so this is {low_label}."
        response = f"{shown} {unit} is low, consistent with {low_label}."
    elif value > high:
        cot += f"That is above the upper limit of {high}, so this is {high_label}."
        response = f"{shown} {unit} is high, consistent with {high_label}."
    else:
        cot += f"That lies between {low} and {high}, so it is within the normal range."
        response = f"{shown} {unit} is within the normal range."
    return {"Question": question, "Complex_CoT": cot, "Response": response}


# condition, key findings (at least three), a tempting alternative and why it fits less well
VIGNETTES = [
    ("acute myocardial infarction",
     ["crushing central chest pain", "pain spreading to the left arm", "sweating", "nausea",
      "ST elevation on the ECG"],
     "stable angina", "angina settles with rest within minutes, and this pain has not"),
    ("acute appendicitis",
     ["pain that began around the navel and moved to the right lower abdomen", "fever",
      "loss of appetite", "tenderness at McBurney's point"],
     "a kidney stone", "a stone gives colicky loin-to-groin pain without this migration"),
    ("type 2 diabetes",
     ["increased thirst", "passing urine often", "tiredness", "blurred vision",
      "a fasting glucose of 140 mg/dL"],
     "diabetes insipidus", "diabetes insipidus does not raise the blood glucose"),
    ("iron deficiency anaemia",
     ["tiredness", "pale skin", "shortness of breath on exertion", "heavy menstrual periods",
      "small pale red cells on the blood film"],
     "vitamin B12 deficiency", "B12 deficiency gives large red cells, not small ones"),
    ("hypothyroidism",
     ["weight gain", "feeling cold", "constipation", "dry skin", "a slow pulse"],
     "depression", "depression does not explain the cold intolerance and slow pulse"),
    ("community-acquired pneumonia",
     ["fever", "a cough with green sputum", "pleuritic chest pain",
      "crackles over the right lower lobe", "a raised respiratory rate"],
     "acute bronchitis", "bronchitis does not give focal crackles with a high fever"),
    ("asthma",
     ["episodes of wheeze", "a cough that is worse at night", "chest tightness after exercise",
      "symptoms that improve with an inhaler"],
     "COPD", "COPD usually starts later in life in smokers and does not reverse fully"),
    ("migraine",
     ["a throbbing one-sided headache", "sensitivity to light", "nausea",
      "flashing lights before the headache"],
     "tension headache", "tension headache is a band-like pressure without nausea or aura"),
    ("gout",
     ["sudden severe pain in the big toe", "a red, hot, swollen joint", "pain that started at night",
      "a history of heavy alcohol use"],
     "cellulitis", "cellulitis spreads through the skin rather than centring on one joint"),
    ("deep vein thrombosis",
     ["a swollen calf on one side", "calf pain", "warmth over the calf",
      "a long flight a few days earlier"],
     "a muscle strain", "a strain follows an injury and does not cause this one-sided swelling"),
    ("bacterial meningitis",
     ["fever", "a severe headache", "neck stiffness", "dislike of bright light", "a purple rash"],
     "migraine", "migraine does not cause fever and neck stiffness"),
    ("urinary tract infection",
     ["burning when passing urine", "passing urine often", "lower abdominal discomfort",
      "cloudy urine"],
     "a vaginal infection", "that would give discharge rather than urinary frequency"),
    ("hyperthyroidism",
     ["weight loss despite a good appetite", "a fast pulse", "heat intolerance", "tremor",
      "anxiety"],
     "an anxiety disorder", "anxiety alone does not cause weight loss with a good appetite"),
    ("acute cholecystitis",
     ["pain in the right upper abdomen", "pain after a fatty meal", "fever",
      "a positive Murphy's sign"],
     "peptic ulcer disease", "an ulcer causes epigastric pain and not a positive Murphy's sign"),
    ("ischaemic stroke",
     ["sudden weakness of the right arm and leg", "slurred speech", "a drooping face",
      "onset within the last hour"],
     "a migraine with aura", "aura builds up slowly over minutes and usually resolves"),
    ("vitamin B12 deficiency",
     ["tiredness", "tingling in the feet", "a sore smooth tongue", "large red cells on the blood film"],
     "iron deficiency", "iron deficiency gives small red cells and no nerve symptoms"),
    ("coeliac disease",
     ["chronic diarrhoea", "bloating", "weight loss", "iron deficiency",
      "symptoms that get worse after eating bread"],
     "irritable bowel syndrome", "IBS does not cause weight loss or iron deficiency"),
    ("heart failure",
     ["shortness of breath when lying flat", "swollen ankles", "waking at night breathless",
      "crackles at both lung bases"],
     "pneumonia", "pneumonia gives fever and focal signs rather than swollen ankles"),
]


def clinical_vignette(rng: random.Random) -> Example:
    condition, findings, alternative, why_not = rng.choice(VIGNETTES)
    chosen = rng.sample(findings, rng.randint(3, len(findings)))
    age = rng.randint(19, 78)
    sex = rng.choice(["man", "woman"])
    if "menstrual" in " ".join(chosen) or condition == "urinary tract infection":
        sex = "woman"
    listed = ", ".join(chosen[:-1]) + " and " + chosen[-1]
    question = (
        f"A {age}-year-old {sex} presents with {listed}. What is the most likely diagnosis?"
    )
    cot_parts = [rng.choice(OPENINGS), f"The main features are {listed}."]
    cot_parts.append(
        f"Putting {chosen[0]} together with {chosen[1]} already points toward {condition}."
    )
    cot_parts.append(f"{chosen[2][0].upper() + chosen[2][1:]} fits with that as well.")
    cot_parts.append(
        f"Could it be {alternative} instead? Probably not, because {why_not}."
    )
    cot_parts.append(f"So the picture fits {condition} best.")
    response = (
        f"The most likely diagnosis is {condition}. The combination of {chosen[0]}, {chosen[1]} "
        f"and {chosen[2]} is typical, and {alternative} fits less well."
    )
    return {"Question": question, "Complex_CoT": " ".join(cot_parts), "Response": response}


TEMPLATES: list[tuple[Callable[[random.Random], Example], int]] = [
    (shopping_change, 3),
    (travel_distance, 2),
    (sharing_remainder, 2),
    (percent_discount, 2),
    (age_difference, 2),
    (production_rate, 2),
    (weight_based_dose, 3),
    (tablets_needed, 2),
    (infusion_rate, 3),
    (body_mass_index, 2),
    (fluid_balance, 2),
    (ecg_heart_rate, 2),
    (lab_interpretation, 3),
    (clinical_vignette, 5),
]


def generate_examples(count: int, seed: int) -> list[Example]:
    """Draw `count` distinct examples; the same (count, seed) always gives the same list."""
    rng = random.Random(seed)
    templates = [template for template, _ in TEMPLATES]
    weights = [weight for _, weight in TEMPLATES]
    examples: list[Example] = []
    seen_questions: set[str] = set()
    while len(examples) < count:
        template = rng.choices(templates, weights=weights)[0]
        example = template(rng)
        if example["Question"] in seen_questions:
            continue
        seen_questions.add(example["Question"])
        examples.append(example)
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "data" / "reasoning.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for example in generate_examples(args.count, args.seed):
            handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    print(f"wrote {args.count} examples to {args.out}")


if __name__ == "__main__":
    main()
