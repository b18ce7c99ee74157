"""The ``legal`` domain: generated contracts and statutes, plus real open-source licence texts.

Contracts are assembled from a library of clause templates (definitions, term and termination, fees,
confidentiality, warranties, indemnification, limitation of liability, governing law, force majeure,
assignment, notices, general provisions and clauses specific to each kind of agreement), with parties,
dates, amounts and jurisdictions drawn at random. Sections are numbered first, so that cross-references
such as "Section 7(b)" point at the section that really carries that heading. Statutes follow the shape
of a short act: short title, definitions, duties, prohibitions, exceptions, penalties with references
like "Section 104(b)(ii)", enforcement, severability and an effective date.

About one document in seven is a chunk of a real licence (Apache-2.0, GPL, LGPL, MPL-2.0, BSD,
Artistic, CC0), shipped verbatim in ``flexmoe/assets/licenses.jsonl.xz`` (see DATA.md).
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources

from flexmoe.corpora._rand import Rand, until_budget

LICENCE_SHARE = 0.15  # fraction of documents that are real licence chunks, while any remain

# ---------------------------------------------------------------------------------------------------
# Numbers, dates and names
# ---------------------------------------------------------------------------------------------------

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MONTHS = ("January February March April May June July August September October November December").split()
ORDINAL_WORDS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def num_words(n: int) -> str:
    """English words for 0 <= n < 10**12: ``25000`` -> ``twenty-five thousand``."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{ONES[n // 100]} hundred" + (f" {num_words(n % 100)}" if n % 100 else "")
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand")):
        if n >= size:
            rest = n % size
            return f"{num_words(n // size)} {name}" + (f" {num_words(rest)}" if rest else "")
    raise ValueError(n)


def money(n: int) -> str:
    """Contract style: ``Twenty-Five Thousand Dollars ($25,000.00)``."""
    words = " ".join(
        w.capitalize() if "-" not in w else "-".join(p.capitalize() for p in w.split("-"))
        for w in num_words(n).split()
    )
    return f"{words} Dollars (${n:,}.00)"


def days(n: int) -> str:
    """``thirty (30) days``."""
    return f"{num_words(n)} ({n}) days"


def _roman(n: int) -> str:
    out = ""
    for value, sym in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out, n = out + sym, n - value
    return out


def _date(r: Rand, lo: int = 2012, hi: int = 2025) -> str:
    return f"{r.pick(MONTHS)} {r.between(1, 28)}, {r.between(lo, hi)}"


COMPANY_A = (
    "Northwind",
    "Bluestone",
    "Redwood",
    "Silverline",
    "Granite",
    "Meridian",
    "Cobalt",
    "Summit",
    "Evergreen",
    "Brightwater",
    "Ironbridge",
    "Lakeshore",
    "Oakmont",
    "Pinecrest",
    "Riverton",
    "Sterling",
    "Westfield",
    "Ashford",
    "Crescent",
    "Beacon",
    "Harborview",
    "Kestrel",
    "Larkspur",
    "Marlowe",
    "Norcross",
    "Orion",
    "Palisade",
    "Quarry",
    "Rowan",
    "Saltmarsh",
    "Tidewater",
    "Vantage",
    "Whitmore",
    "Yellowpine",
    "Zenith",
)
COMPANY_B = (
    "Logistics",
    "Analytics",
    "Software",
    "Manufacturing",
    "Capital",
    "Health",
    "Foods",
    "Energy",
    "Media",
    "Biotech",
    "Consulting",
    "Robotics",
    "Pharmaceuticals",
    "Shipping",
    "Realty",
    "Data Systems",
    "Engineering",
    "Textiles",
    "Partners",
    "Holdings",
    "Technologies",
    "Labs",
    "Industries",
    "Ventures",
)
ENTITY = (
    ("Inc.", "corporation"),
    ("LLC", "limited liability company"),
    ("Corporation", "corporation"),
    ("Ltd.", "private limited company"),
    ("LLP", "limited liability partnership"),
    ("Co.", "corporation"),
)
FIRST = (
    "James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Susan Richard Jessica "
    "Joseph Sarah Thomas Karen Daniel Nancy Priya Wei Ahmed Sofia Mateo Ingrid Kwame Yuki Olivia Hassan "
    "Elena Tomasz Amara Diego Fatima Lars Chen Aisha Rafael Hannah"
).split()
LAST = (
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Wilson "
    "Anderson Thomas Taylor Moore Jackson Martin Lee Okafor Nakamura Kowalski Lindqvist Haddad Patel "
    "Novak Fischer Rossi Moreau Kim Osei Castillo Bergstrom Duarte Whitfield Abernathy Callahan"
).split()
TITLES = (
    "Chief Executive Officer",
    "President",
    "General Counsel",
    "Chief Financial Officer",
    "Managing Director",
    "Vice President, Operations",
    "Chief Operating Officer",
    "Secretary",
    "Authorized Signatory",
)
# (governing law phrase, courts, the place used in addresses)
JURISDICTIONS = (
    ("the State of Delaware", "the state and federal courts located in Wilmington, Delaware", "Delaware"),
    (
        "the State of New York",
        "the state and federal courts sitting in the Borough of Manhattan, New York",
        "New York",
    ),
    (
        "the State of California",
        "the state and federal courts located in San Francisco County, California",
        "California",
    ),
    ("the State of Texas", "the state and federal courts located in Travis County, Texas", "Texas"),
    ("the State of Illinois", "the state and federal courts located in Cook County, Illinois", "Illinois"),
    (
        "the Commonwealth of Massachusetts",
        "the state and federal courts located in Suffolk County, Massachusetts",
        "Massachusetts",
    ),
    (
        "the State of Washington",
        "the state and federal courts located in King County, Washington",
        "Washington",
    ),
    ("England and Wales", "the courts of England and Wales", "England"),
    ("the Province of Ontario", "the courts of the Province of Ontario", "Ontario"),
    ("the State of Colorado", "the state and federal courts located in Denver, Colorado", "Colorado"),
)
STREETS = (
    "Market",
    "Main",
    "Harbor",
    "Commerce",
    "Elm",
    "Lexington",
    "Maple",
    "Bridge",
    "Canal",
    "Park",
    "Mill",
    "Station",
    "Oak",
    "Union",
    "Water",
)
STREET_TYPES = ("Street", "Avenue", "Boulevard", "Road", "Plaza", "Drive", "Way")
CITIES = (
    "Springfield",
    "Fairview",
    "Georgetown",
    "Riverside",
    "Franklin",
    "Greenville",
    "Bristol",
    "Clinton",
    "Madison",
    "Arlington",
    "Salem",
    "Kingston",
    "Ashland",
    "Milton",
    "Dover",
)


def _an(word: str) -> str:
    """The indefinite article for a word: "an Ontario", "a Delaware"."""
    return "an" if word[0].upper() in "AEIOU" else "a"


def _person(r: Rand) -> str:
    return f"{r.pick(FIRST)} {r.pick(LAST)}"


def _company(r: Rand) -> tuple[str, str]:
    """A company name and its entity description (``Bluestone Analytics, Inc.``, ``corporation``)."""
    suffix, kind = r.pick(ENTITY)
    sep = ", " if suffix == "Inc." and r.chance(0.5) else " "
    return f"{r.pick(COMPANY_A)} {r.pick(COMPANY_B)}{sep}{suffix}", kind


def _address(r: Rand, place: str) -> str:
    return f"{r.between(1, 9999)} {r.pick(STREETS)} {r.pick(STREET_TYPES)}, {r.pick(CITIES)}, {place}"


# ---------------------------------------------------------------------------------------------------
# Kinds of agreement: title, the two roles, the subject matter and the purpose clause
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """One kind of contract: its possible titles, the two roles, subject matters and own clauses."""

    title: tuple[str, ...]
    roles: tuple[str, str]
    subject: tuple[str, ...]
    specific: tuple[str, ...]  # keys into SPECIFIC


_AGREEMENT_DATA: dict[str, dict] = {
    "distribution": {
        "title": ("DISTRIBUTION AGREEMENT", "EXCLUSIVE DISTRIBUTION AGREEMENT", "RESELLER AGREEMENT"),
        "roles": ("Supplier", "Distributor"),
        "subject": (
            "solar panels and mounting kits",
            "specialty teas",
            "laboratory glassware",
            "outdoor furniture",
            "veterinary supplements",
        ),
        "specific": ("appointment", "delivery"),
    },
    "nda": {
        "title": ("MUTUAL NON-DISCLOSURE AGREEMENT", "CONFIDENTIALITY AGREEMENT", "NON-DISCLOSURE AGREEMENT"),
        "roles": ("Disclosing Party", "Receiving Party"),
        "subject": (
            "a potential joint venture for the development of battery storage systems",
            "a possible acquisition of certain assets",
            "a proposed distribution arrangement in North America",
            "the evaluation of a proposed software integration",
            "a potential research collaboration",
        ),
        "specific": ("purpose", "return"),
    },
    "services": {
        "title": ("MASTER SERVICES AGREEMENT", "PROFESSIONAL SERVICES AGREEMENT", "SERVICES AGREEMENT"),
        "roles": ("Provider", "Client"),
        "subject": (
            "software development and maintenance services",
            "warehousing and logistics services",
            "marketing and advertising services",
            "payroll processing services",
            "facility cleaning services",
            "data hosting and support services",
        ),
        "specific": ("services", "acceptance"),
    },
    "license": {
        "title": ("SOFTWARE LICENSE AGREEMENT", "END USER LICENSE AGREEMENT", "TECHNOLOGY LICENSE AGREEMENT"),
        "roles": ("Licensor", "Licensee"),
        "subject": (
            "the inventory management software known as StockPilot",
            "a proprietary image recognition library",
            "the scheduling platform known as ShiftWise",
            "certain patented water filtration technology",
            "the accounting application known as LedgerLine",
        ),
        "specific": ("grant", "restrictions"),
    },
    "lease": {
        "title": ("COMMERCIAL LEASE AGREEMENT", "OFFICE LEASE", "LEASE AGREEMENT"),
        "roles": ("Landlord", "Tenant"),
        "subject": (
            "approximately 4,500 square feet of office space",
            "a warehouse unit of approximately 12,000 square feet",
            "ground-floor retail premises",
            "two floors of an office building",
        ),
        "specific": ("premises", "rent"),
    },
    "consulting": {
        "title": ("CONSULTING AGREEMENT", "INDEPENDENT CONTRACTOR AGREEMENT"),
        "roles": ("Consultant", "Company"),
        "subject": (
            "strategic advice on market expansion",
            "regulatory compliance advice",
            "engineering design review",
            "advice on the redesign of the Company's supply chain",
        ),
        "specific": ("services", "contractor"),
    },
    "supply": {
        "title": ("SUPPLY AGREEMENT", "MANUFACTURING AND SUPPLY AGREEMENT", "PURCHASE AGREEMENT"),
        "roles": ("Supplier", "Buyer"),
        "subject": (
            "molded plastic components",
            "organic coffee beans",
            "industrial sensors",
            "printed circuit boards",
            "packaging materials",
        ),
        "specific": ("delivery", "acceptance"),
    },
    "loan": {
        "title": ("LOAN AGREEMENT", "TERM LOAN AGREEMENT", "PROMISSORY NOTE AND LOAN AGREEMENT"),
        "roles": ("Lender", "Borrower"),
        "subject": (
            "working capital",
            "the purchase of equipment",
            "the refinancing of existing indebtedness",
            "the construction of a distribution center",
        ),
        "specific": ("loan", "covenants"),
    },
}

AGREEMENTS = {kind: Agreement(**d) for kind, d in _AGREEMENT_DATA.items()}

DEFINED_TERMS = {
    "Affiliate": "means any entity that directly or indirectly controls, is controlled by, or is under "
    "common "
    'control with a Party, where "control" means ownership of more than fifty percent (50%) of the voting '
    "interests of the entity",
    "Business Day": "means any day other than a Saturday, a Sunday or a day on which banks in {place} are "
    "authorized or required by law to close",
    "Confidential Information": "means all non-public information disclosed by or on behalf of a Party, "
    "whether orally, in writing or in any other form, that is designated as confidential or that a "
    "reasonable person would understand to be confidential",
    "Intellectual Property Rights": "means all patents, copyrights, trademarks, trade secrets, database "
    "rights and other intellectual property rights, whether registered or unregistered, anywhere in the "
    "world",
    "Losses": "means all losses, damages, liabilities, costs and expenses, including reasonable attorneys' "
    "fees",
    "Effective Date": "has the meaning given in the preamble",
    "Applicable Law": "means all laws, statutes, regulations and binding orders that apply to a Party or to "
    "the subject matter of this Agreement",
    "Deliverables": "means all documents, software, reports and other materials that the {a} provides to "
    "the {b} under this Agreement",
    "Personal Data": "means any information relating to an identified or identifiable natural person",
    "Fees": "means the amounts payable under {fees}",
}
TERRITORIES = (
    "the United States of America",
    "the United States and Canada",
    "the European Economic Area",
    "the United Kingdom",
    "worldwide",
    "the States of New York, New Jersey and Connecticut",
)


class Ctx:
    """Everything one contract's clauses share: parties, roles, amounts and the section numbering."""

    def __init__(self, r: Rand, kind: str):
        spec = AGREEMENTS[kind]
        self.kind = kind
        self.title = r.pick(spec.title)
        self.a, self.b = spec.roles
        self.subject = r.pick(spec.subject)
        self.party_a, self.kind_a = _company(r)
        self.party_b, self.kind_b = _company(r)
        self.law, self.courts, self.place = r.pick(JURISDICTIONS)
        self.place_a = r.pick(JURISDICTIONS)[2]
        self.place_b = r.pick(JURISDICTIONS)[2]
        self.date = _date(r)
        self.territory = r.pick(TERRITORIES)
        self.amount = r.between(2, 400) * r.pick((500, 1000, 2500, 5000))
        self.cap = r.pick((1, 2, 3, 6, 12))  # liability cap in months of fees
        self.term_years = r.between(1, 5)
        plural = "s" if self.term_years > 1 else ""
        self.years = f"{num_words(self.term_years)} ({self.term_years}) year{plural}"
        self.notice_days = r.pick((10, 15, 30, 45, 60, 90))
        self.pay_days = r.pick((15, 30, 45, 60))
        self.rate = r.pick(("one percent (1%)", "one and one-half percent (1.5%)", "two percent (2%)"))
        self.sections: dict[str, int] = {}

    def ref(self, key: str, sub: str = "") -> str:
        """``Section 7(b)`` for the section that carries ``key``; falls back to a neutral phrase."""
        if key not in self.sections:
            return "this Agreement"
        return f"Section {self.sections[key]}{sub}"

    def fill(self, text: str) -> str:
        return text.format(
            a=self.a,
            b=self.b,
            subject=self.subject,
            law=self.law,
            courts=self.courts,
            place=self.place,
            territory=self.territory,
            amount=money(self.amount),
            cap=self.cap,
            notice=days(self.notice_days),
            pay=days(self.pay_days),
            rate=self.rate,
            years=self.years,
            nth=ORDINAL_WORDS[self.term_years - 1],
            fees=self.ref("fees"),
        )


# ---------------------------------------------------------------------------------------------------
# Clause library: each clause returns (heading, list of subsections); a subsection may hold a list
# of (i), (ii), ... items as a tuple (text, [items]).
# ---------------------------------------------------------------------------------------------------

Sub = str | tuple[str, list[str]]
Clause = Callable[[Rand, Ctx], tuple[str, list[Sub]]]


def c_definitions(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    # "Fees" points at the fees section, so it is only defined when that section exists
    candidates = tuple(t for t in DEFINED_TERMS if t != "Fees" or "fees" in x.sections)
    terms = sorted(r.picks(candidates, r.between(3, 6)))
    intro = r.pick(
        (
            "In this Agreement, the following terms have the meanings set out below:",
            "Capitalized terms used in this Agreement have the following meanings:",
        )
    )
    subs: list[Sub] = [(intro, [f'"{t}" ' + x.fill(DEFINED_TERMS[t]) + ";" for t in terms])]
    subs.append(
        r.pick(
            (
                'Headings are for convenience only and do not affect interpretation. The words "including" '
                'and "includes" mean "including without limitation".',
                "References to a statute include that statute as amended or re-enacted from time to time.",
                "Words in the singular include the plural and vice versa.",
            )
        )
    )
    return "Definitions", subs


def c_term(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        x.fill(
            r.pick(
                (
                    "This Agreement commences on the Effective Date and continues for a period of {years}"
                    ' (the "Initial Term"), unless terminated earlier in accordance with this Section.',
                    "The term of this Agreement begins on the Effective Date and ends on the {nth} "
                    "anniversary "
                    "thereof, unless earlier terminated as provided herein.",
                )
            )
        ),
        x.fill(
            r.pick(
                (
                    "Upon expiry of the Initial Term, this Agreement shall renew automatically for "
                    "successive "
                    "periods of one (1) year unless either Party gives written notice of non-renewal at "
                    "least "
                    "{notice} before the end of the then-current term.",
                    "The Parties may extend the term by written agreement signed by both Parties.",
                )
            )
        ),
        (
            "Either Party may terminate this Agreement with immediate effect by written notice if the "
            "other Party:",
            [
                x.fill(
                    "commits a material breach of this Agreement and fails to cure that breach within "
                    "{notice} "
                    "after receiving written notice of it;"
                ),
                "becomes insolvent, makes a general assignment for the benefit of creditors, or has a "
                "receiver, "
                "trustee or similar officer appointed over all or a substantial part of its assets; or",
                "ceases to carry on business in the ordinary course.",
            ],
        ),
        _survival(r, x),
    ]
    return r.pick(("Term and Termination", "Duration and Termination")), subs


def _survival(r: Rand, x: Ctx) -> str:
    """Which sections survive termination: only those that this contract really has."""
    keys = [k for k in ("confidentiality", "ip", "indemnification", "liability", "law") if k in x.sections]
    if len(keys) < 2 or r.chance(0.3):
        return (
            "Upon termination, each Party shall promptly return or destroy the other Party's Confidential "
            "Information, and any accrued but unpaid amounts become immediately due and payable."
        )
    refs = [x.ref(k) for k in keys]
    return (
        "Termination does not affect any rights or obligations that accrued before termination. "
        f"{', '.join(refs[:-1])} and {refs[-1]} survive any termination or expiry of this Agreement."
    )


def c_fees(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    what = {"lease": "rent", "loan": "interest and principal"}.get(x.kind, "fees")
    subs: list[Sub] = [
        x.fill(
            r.pick(
                (
                    "In consideration of the performance of its obligations, the {b} shall pay the {a} the "
                    "sum of "
                    '{amount} (the "Fees"), payable as set out in this Section.',
                    "The {b} shall pay the {a} the fees set out in Schedule A, which shall not exceed "
                    "{amount} in "
                    "any calendar year without the prior written approval of the {b}.",
                )
            )
        ),
        x.fill(
            "The {a} shall invoice the {b} monthly in arrears, and the {b} shall pay each undisputed "
            "invoice within "
            "{pay} after the date of receipt."
        ),
        x.fill(
            r.pick(
                (
                    "Any amount not paid when due shall bear interest at the rate of {rate} per month, or "
                    "the "
                    "maximum rate permitted by Applicable Law, if lower.",
                    "Late payments accrue interest at {rate} per month from the due date until the date of "
                    "payment in full.",
                )
            )
        ),
        r.pick(
            (
                f"All {what} are exclusive of sales, use, value added and similar taxes, which the paying "
                "Party "
                "shall bear, other than taxes on the net income of the receiving Party.",
                f"If the {x.b} disputes any invoice in good faith, it shall notify the {x.a} in writing of "
                "the "
                "disputed amount and the reasons for the dispute, and shall pay the undisputed portion "
                "when due.",
            )
        ),
    ]
    return r.pick(("Fees and Payment", "Payment Terms", "Compensation")), subs


def c_confidentiality(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        r.pick(
            (
                "Each Party shall keep the other Party's Confidential Information strictly confidential "
                "and shall "
                "not use it for any purpose other than the performance of this Agreement.",
                "The receiving Party shall protect the Confidential Information of the disclosing Party "
                "using at "
                "least the same degree of care that it uses to protect its own confidential information of a "
                "similar nature, and in no event less than reasonable care.",
            )
        ),
        (
            "The obligations in this Section do not apply to information that:",
            [
                "is or becomes generally available to the public other than through a breach of this "
                "Agreement;",
                "was lawfully known to the receiving Party before disclosure, free of any obligation of "
                "confidence;",
                "is lawfully obtained from a third party that is not bound by a duty of confidentiality; or",
                "is independently developed by the receiving Party without use of or reference to the "
                "Confidential Information.",
            ],
        ),
        r.pick(
            (
                "The receiving Party may disclose Confidential Information to the extent required by law "
                "or by "
                "order of a court of competent jurisdiction, provided that it gives the disclosing Party "
                "prompt "
                "written notice, where lawful, and cooperates with any effort to obtain a protective order.",
                "The receiving Party may disclose Confidential Information to its employees, officers and "
                "professional advisers who need to know it for the purposes of this Agreement and who are "
                "bound "
                "by obligations of confidentiality no less protective than those in this Section.",
            )
        ),
        x.fill(
            r.pick(
                (
                    "The obligations in this Section continue for a period of {years} after the "
                    "termination or expiry of this Agreement, and, in respect of trade secrets, for as "
                    "long as "
                    "they remain trade secrets under Applicable Law.",
                    "Each Party acknowledges that a breach of this Section may cause irreparable harm for "
                    "which "
                    "damages would not be an adequate remedy, and that the other Party is entitled to seek "
                    "injunctive relief in addition to any other remedy.",
                )
            )
        ),
    ]
    return r.pick(("Confidentiality", "Confidential Information", "Non-Disclosure")), subs


def c_ip(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "Each Party retains all right, title and interest in and to its Intellectual Property Rights "
        "existing "
        "before the Effective Date or developed independently of this Agreement.",
        x.fill(
            r.pick(
                (
                    "Subject to payment in full of the Fees, all Intellectual Property Rights in the "
                    "Deliverables "
                    "shall vest in the {b} upon creation, and the {a} hereby assigns to the {b} all such "
                    "rights.",
                    "The {a} grants the {b} a non-exclusive, royalty-free, perpetual licence to use the "
                    "Deliverables for its internal business purposes.",
                )
            )
        ),
        r.pick(
            (
                "Neither Party shall use the other Party's name, logo or trademarks without its prior "
                "written "
                "consent.",
                "Nothing in this Agreement grants either Party any right in the other Party's Intellectual "
                "Property Rights except as expressly stated in this Agreement.",
            )
        ),
    ]
    return r.pick(("Intellectual Property", "Ownership of Work Product")), subs


def c_warranties(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        (
            "Each Party represents and warrants to the other Party that:",
            [
                "it is duly organized, validly existing and in good standing under the laws of its "
                "jurisdiction "
                "of organization;",
                "it has full power and authority to enter into and perform this Agreement;",
                "the execution and performance of this Agreement do not conflict with any other agreement to "
                "which it is a party; and",
                "it shall comply with all Applicable Law in the performance of this Agreement.",
            ],
        ),
        x.fill(
            {
                "supply": "The {a} warrants that the Products shall be free from material defects in "
                "materials "
                "and workmanship for a period of twelve (12) months from delivery.",
                "license": "The {a} warrants that the Licensed Technology shall perform substantially in "
                "accordance with its documentation for ninety (90) days from the Effective Date.",
            }.get(
                x.kind,
                "The {a} warrants that it shall perform its obligations in a professional and workmanlike "
                "manner, in accordance with generally recognized industry standards.",
            )
        ),
        "EXCEPT AS EXPRESSLY SET OUT IN THIS AGREEMENT, NEITHER PARTY MAKES ANY OTHER WARRANTY, EXPRESS OR "
        "IMPLIED, INCLUDING ANY IMPLIED WARRANTY OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE OR "
        "NON-INFRINGEMENT.",
    ]
    return r.pick(("Representations and Warranties", "Warranties")), subs


def c_indemnification(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        (
            x.fill(
                "The {a} shall defend, indemnify and hold harmless the {b} and its Affiliates, officers, "
                "directors "
                "and employees from and against all Losses arising out of any third-party claim to the "
                "extent "
                "that the claim results from:"
            ),
            [
                "the gross negligence or wilful misconduct of the indemnifying Party;",
                "any breach of the indemnifying Party's obligations under "
                + x.ref("confidentiality")
                + "; or",
                "any allegation that the Deliverables infringe the Intellectual Property Rights of a third "
                "party.",
            ],
        ),
        "The indemnified Party shall (i) notify the indemnifying Party promptly in writing of the claim, "
        "(ii) give the indemnifying Party sole control of the defence and settlement of the claim, and "
        "(iii) provide reasonable cooperation at the indemnifying Party's expense.",
        r.pick(
            (
                "The indemnifying Party shall not settle any claim in a manner that imposes any obligation "
                "on the "
                "indemnified Party without its prior written consent, which shall not be unreasonably "
                "withheld.",
                "The indemnified Party may participate in the defence of any claim with counsel of its own "
                "choice "
                "at its own expense.",
            )
        ),
    ]
    return r.pick(("Indemnification", "Indemnity")), subs


def c_liability(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "IN NO EVENT SHALL EITHER PARTY BE LIABLE FOR ANY INDIRECT, INCIDENTAL, SPECIAL, CONSEQUENTIAL OR "
        "PUNITIVE DAMAGES, OR FOR ANY LOSS OF PROFITS, REVENUE, DATA OR GOODWILL, HOWEVER CAUSED, EVEN IF "
        "ADVISED OF THE POSSIBILITY OF SUCH DAMAGES.",
        r.pick(
            (
                "EACH PARTY'S TOTAL AGGREGATE LIABILITY ARISING OUT OF OR IN CONNECTION WITH THIS AGREEMENT "
                f"SHALL NOT EXCEED THE AMOUNTS PAID OR PAYABLE BY THE {x.b.upper()} IN THE "
                f"{num_words(x.cap).upper()} ({x.cap}) MONTH{'S' if x.cap > 1 else ''} PRECEDING THE EVENT "
                "GIVING RISE TO THE CLAIM.",
                f"THE TOTAL LIABILITY OF EITHER PARTY UNDER THIS AGREEMENT SHALL BE LIMITED TO "
                f"{money(x.amount).upper()}.",
            )
        ),
        _carve_outs(x),
    ]
    return "Limitation of Liability", subs


def _carve_outs(x: Ctx) -> str:
    """Exclusions from the liability cap, naming only sections that exist in this contract."""
    refs = [f"obligations under {x.ref('indemnification')}"] if "indemnification" in x.sections else []
    refs += [f"breach of {x.ref('confidentiality')}"] if "confidentiality" in x.sections else []
    refs += ["liability for fraud, death or personal injury caused by negligence"]
    listed = (
        ", ".join(refs[:-1]) + (", or " if len(refs) > 2 else " or ") + refs[-1] if len(refs) > 1 else refs[0]
    )
    return f"The limitations in this Section do not apply to {listed}."


def c_law(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        x.fill(
            r.pick(
                (
                    "This Agreement and any dispute arising out of or in connection with it shall be "
                    "governed by "
                    "and construed in accordance with the laws of {law}, without regard to its conflict of "
                    "laws "
                    "principles.",
                    "This Agreement is governed by the laws of {law}.",
                )
            )
        ),
        x.fill(
            r.pick(
                (
                    "Each Party irrevocably submits to the exclusive jurisdiction of {courts} for the "
                    "resolution "
                    "of any dispute arising under this Agreement.",
                    "Any dispute that the Parties cannot resolve by good faith negotiation within {notice} "
                    "shall "
                    "be referred to binding arbitration seated in {place}, conducted in English by a single "
                    "arbitrator.",
                )
            )
        ),
        "EACH PARTY WAIVES, TO THE FULLEST EXTENT PERMITTED BY LAW, ANY RIGHT TO A TRIAL BY JURY IN ANY "
        "ACTION "
        "ARISING OUT OF THIS AGREEMENT."
        if r.chance(0.5)
        else "Nothing in this Section prevents a Party from seeking urgent injunctive relief in any court of "
        "competent jurisdiction.",
    ]
    return r.pick(("Governing Law and Jurisdiction", "Governing Law; Dispute Resolution")), subs


def c_force_majeure(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "Neither Party shall be liable for any failure or delay in performing its obligations (other than "
        "obligations to pay money) to the extent caused by events beyond its reasonable control, including "
        "fire, "
        "flood, earthquake, epidemic, war, terrorism, riot, labour disputes not involving its own employees, "
        'acts of government or failure of public utilities (a "Force Majeure Event").',
        "The affected Party shall notify the other Party promptly of the Force Majeure Event and use "
        "commercially reasonable efforts to mitigate its effects.",
        x.fill(
            "If a Force Majeure Event continues for more than {notice}, either Party may terminate this "
            "Agreement "
            "by written notice to the other Party."
        ),
    ]
    return "Force Majeure", subs


def c_assignment(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        r.pick(
            (
                "Neither Party may assign or transfer this Agreement, in whole or in part, without the prior "
                "written consent of the other Party, which shall not be unreasonably withheld.",
                "Neither Party may assign any of its rights or delegate any of its obligations under this "
                "Agreement without the other Party's prior written consent.",
            )
        ),
        "Notwithstanding the foregoing, either Party may assign this Agreement without consent to an "
        "Affiliate "
        "or to a successor in connection with a merger, reorganization or sale of all or substantially all "
        "of "
        "its assets, provided that the assignee agrees in writing to be bound by this Agreement.",
        "Any purported assignment in violation of this Section is void. This Agreement binds and benefits "
        "the "
        "Parties and their respective permitted successors and assigns.",
    ]
    return r.pick(("Assignment", "Assignment and Subcontracting")), subs


def c_notices(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "All notices under this Agreement shall be in writing and shall be delivered by hand, sent by "
        "registered mail or nationally recognized courier, or sent by email with confirmation of "
        "transmission, "
        "to the address of the receiving Party set out in the preamble or to such other address as a Party "
        "may "
        "designate by notice.",
        r.pick(
            (
                "A notice is deemed received: if delivered by hand, on delivery; if sent by courier, two (2) "
                "Business Days after dispatch; and if sent by email, at the time of transmission, provided "
                "that "
                "no error message is received.",
                "Notices sent by email shall be effective only if a copy is also sent by one of the other "
                "methods "
                "described in this Section within two (2) Business Days.",
            )
        ),
    ]
    return "Notices", subs


def c_general(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    pool = [
        "Entire Agreement. This Agreement, together with its schedules, constitutes the entire agreement "
        "between "
        "the Parties and supersedes all prior agreements, understandings and representations relating to its "
        "subject matter.",
        "Amendment. No amendment to this Agreement is effective unless it is in writing and signed by an "
        "authorized representative of each Party.",
        "Severability. If any provision of this Agreement is held invalid or unenforceable, that provision "
        "shall "
        "be enforced to the maximum extent permissible and the remaining provisions shall remain in full "
        "force "
        "and effect.",
        "Waiver. No failure or delay by a Party in exercising any right under this Agreement operates as a "
        "waiver "
        "of that right.",
        "Counterparts. This Agreement may be executed in counterparts, each of which is deemed an original "
        "and "
        "all of which together constitute one instrument.",
        "Relationship of the Parties. The Parties are independent contractors. Nothing in this Agreement "
        "creates "
        "a partnership, joint venture, agency or employment relationship between them.",
        "Third-Party Rights. No person other than the Parties has any right to enforce any term of this "
        "Agreement.",
    ]
    return r.pick(("General Provisions", "Miscellaneous", "General")), r.picks(pool, r.between(3, 6))


def c_non_solicit(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    months = r.pick((6, 12, 18, 24))
    subs: list[Sub] = [
        f"During the term of this Agreement and for {num_words(months)} ({months}) months thereafter, "
        "neither "
        "Party shall, directly or indirectly, solicit for employment any employee of the other Party with "
        "whom it "
        "had material contact in connection with this Agreement.",
        r.pick(
            (
                "General advertisements of employment not targeted at the other Party's employees, and the "
                "hiring "
                "of any person who responds to them, do not breach this Section.",
                "This Section does not restrict the hiring of any person whose employment with the other "
                "Party "
                "ended at least six (6) months before the first contact.",
            )
        ),
    ]
    return r.pick(("Non-Solicitation", "Non-Solicitation of Employees")), subs


def c_insurance(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    limit = r.pick((1, 2, 5, 10)) * 1_000_000
    subs: list[Sub] = [
        (
            x.fill("During the term of this Agreement, the {a} shall maintain, at its own expense:"),
            [
                f"commercial general liability insurance with limits of not less than ${limit:,} per "
                "occurrence;",
                "workers' compensation insurance as required by Applicable Law; and",
                f"professional liability insurance with limits of not less than ${limit // 2:,} per claim.",
            ],
        ),
        x.fill(
            r.pick(
                (
                    "Upon request, the {a} shall provide the {b} with certificates of insurance evidencing "
                    "the "
                    "coverage required by this Section.",
                    "The {a} shall give the {b} at least thirty (30) days' prior written notice of any "
                    "cancellation or material reduction of the required coverage.",
                )
            )
        ),
    ]
    return "Insurance", subs


def c_audit(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    years = r.pick((2, 3, 5, 7))
    subs: list[Sub] = [
        x.fill(
            f"The {{a}} shall keep complete and accurate books and records relating to this Agreement for at "
            f"least {num_words(years)} ({years}) years after the year to which they relate."
        ),
        x.fill(
            "The {b}, or an independent auditor appointed by it, may inspect such books and records on "
            "{notice}' "
            "prior written notice, during normal business hours and not more than once in any calendar year."
        ).replace("days'", "days'"),
        r.pick(
            (
                "If an audit reveals an overcharge of more than five percent (5%) for any period, the "
                "audited "
                "Party shall reimburse the reasonable costs of the audit in addition to refunding the "
                "overcharge.",
                "Each Party shall bear its own costs of any audit, unless the audit reveals a material "
                "breach of "
                "this Agreement.",
            )
        ),
    ]
    return r.pick(("Records and Audit", "Audit Rights")), subs


def c_data_protection(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    hours = r.pick((24, 48, 72))
    subs: list[Sub] = [
        x.fill(
            "To the extent that the {a} processes Personal Data on behalf of the {b}, it shall do so only "
            "on the "
            "documented instructions of the {b} and in accordance with all applicable data protection laws."
        ),
        (
            x.fill("The {a} shall:"),
            [
                "implement appropriate technical and organizational measures to protect Personal Data "
                "against "
                "unauthorized or unlawful processing and against accidental loss, destruction or damage;",
                "ensure that every person authorized to process Personal Data is bound by a duty of "
                "confidentiality;",
                f"notify the {x.b} without undue delay, and in any event within {num_words(hours)} ({hours}) "
                "hours, after becoming aware of a personal data breach; and",
                "delete or return all Personal Data at the end of the provision of the services.",
            ],
        ),
    ]
    return r.pick(("Data Protection", "Processing of Personal Data")), subs


def c_compliance(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "Each Party shall comply with all Applicable Law in connection with the performance of this "
        "Agreement, "
        "including laws relating to anti-bribery, anti-corruption, export control and economic sanctions.",
        r.pick(
            (
                "Neither Party shall offer, give or accept any bribe, kickback or other improper payment in "
                "connection with this Agreement.",
                "Each Party shall promptly notify the other Party if it becomes aware of any breach of "
                "this Section.",
            )
        ),
        "A breach of this Section is a material breach of this Agreement that is not capable of remedy.",
    ]
    return r.pick(("Compliance with Laws", "Anti-Corruption")), subs


def c_publicity(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
    subs: list[Sub] = [
        "Neither Party shall issue any press release or public announcement concerning this Agreement "
        "without the "
        "prior written approval of the other Party.",
        x.fill(
            r.pick(
                (
                    "The {a} may identify the {b} as a customer in its marketing materials, using only the "
                    "{b}'s "
                    "name and approved logo.",
                    "Nothing in this Section prevents a Party from making any disclosure required by law "
                    "or by the "
                    "rules of any stock exchange on which its securities are listed.",
                )
            )
        ),
    ]
    return "Publicity", subs


def c_specific(part: str) -> Clause:
    """Clauses that belong to one kind of agreement only."""

    def clause(r: Rand, x: Ctx) -> tuple[str, list[Sub]]:
        return SPECIFIC[part](r, x)

    return clause


SPECIFIC: dict[str, Callable[[Rand, Ctx], tuple[str, list[Sub]]]] = {
    "purpose": lambda r, x: (
        "Purpose",
        [
            x.fill(
                "The Parties wish to exchange Confidential Information solely for the purpose of evaluating "
                '{subject} (the "Purpose").'
            ),
            "The receiving Party shall use the Confidential Information only for the Purpose and shall not "
            "reverse engineer, decompile or analyse the composition of any materials provided to it.",
            "Nothing in this Agreement obliges either Party to disclose any particular information or to "
            "enter "
            "into any further agreement.",
        ],
    ),
    "return": lambda r, x: (
        "Return of Materials",
        [
            x.fill(
                "Within {notice} after a written request by the disclosing Party, the receiving Party shall "
                "return or destroy all documents and materials containing Confidential Information."
            ),
            "Upon request, an officer of the receiving Party shall certify in writing that it has complied "
            "with "
            "this Section.",
        ],
    ),
    "services": lambda r, x: (
        "Services",
        [
            x.fill(
                'The {a} shall provide {subject} (the "Services") as described in one or more statements of '
                'work executed by both Parties (each, a "Statement of Work").'
            ),
            "Each Statement of Work shall describe the Services, the Deliverables, the schedule and the "
            "applicable fees. In the event of a conflict, this Agreement prevails over a Statement of Work "
            "unless "
            "the Statement of Work expressly states otherwise.",
            x.fill(
                "The {a} shall assign suitably qualified personnel to perform the Services and shall replace "
                "any individual whom the {b} reasonably requests to be removed."
            ),
        ],
    ),
    "acceptance": lambda r, x: (
        "Acceptance",
        [
            x.fill(
                "The {b} shall inspect each Deliverable within {notice} after delivery and shall either "
                "accept "
                "it or give written notice of any non-conformity."
            ),
            x.fill(
                "If the {b} gives notice of a non-conformity, the {a} shall correct it at no additional "
                "charge "
                "and redeliver the Deliverable, and the procedure in this Section shall apply again."
            ),
            x.fill(
                "A Deliverable is deemed accepted if the {b} does not give notice of a non-conformity "
                "within the "
                "period stated in " + x.ref("acceptance", "(a)") + "."
            ),
        ],
    ),
    "grant": lambda r, x: (
        "License Grant",
        [
            x.fill(
                "Subject to the terms of this Agreement, the {a} grants the {b} a non-exclusive, "
                "non-transferable license, without the right to sublicense, to use {subject} (the "
                '"Licensed Technology") in {territory} (the "Territory") during the term of this Agreement.'
            ),
            "All rights not expressly granted in this Agreement are reserved by the Licensor.",
        ],
    ),
    "restrictions": lambda r, x: (
        "Restrictions",
        [
            (
                x.fill("Except as expressly permitted by this Agreement, the {b} shall not:"),
                [
                    "copy, modify or create derivative works of the Licensed Technology;",
                    "sell, rent, lease or otherwise make the Licensed Technology available to any third "
                    "party;",
                    "reverse engineer, decompile or disassemble the Licensed Technology, except to the "
                    "extent "
                    "that such restriction is prohibited by Applicable Law; or",
                    "remove or alter any proprietary notices on the Licensed Technology.",
                ],
            ),
            x.fill(
                "The {b} shall keep accurate records of its use of the Licensed Technology and shall permit "
                "the {a}, on reasonable notice, to audit such records once in any twelve (12) month period."
            ),
        ],
    ),
    "premises": lambda r, x: (
        "Premises",
        [
            x.fill(
                "The {a} leases to the {b}, and the {b} leases from the {a}, {subject} located at "
                + _address(r, x.place)
                + ' (the "Premises").'
            ),
            "The Tenant shall use the Premises only for general office purposes and for no other purpose "
            "without "
            "the Landlord's prior written consent.",
            "The Tenant shall keep the Premises in good repair and condition, reasonable wear and tear "
            "excepted, "
            "and shall not make any structural alterations without the Landlord's prior written consent.",
        ],
    ),
    "rent": lambda r, x: (
        "Rent and Security Deposit",
        [
            x.fill(
                "The Tenant shall pay monthly rent of {amount}, in advance, on the first day of each "
                "calendar "
                "month."
            ),
            x.fill(
                "Upon execution of this Agreement, the Tenant shall pay a security deposit equal to "
                "two (2) months' rent, which the Landlord shall return within {notice} after the end of the "
                "term, less any amounts properly applied to unpaid rent or to the cost of repairing damage."
            ),
        ],
    ),
    "contractor": lambda r, x: (
        "Independent Contractor",
        [
            "The Consultant is an independent contractor and is solely responsible for the payment of all "
            "taxes, "
            "insurance and benefits relating to its personnel.",
            "The Consultant may determine the method, details and means of performing the Services, and may "
            "perform services for other clients provided that doing so does not breach this Agreement.",
        ],
    ),
    "delivery": lambda r, x: (
        "Orders and Delivery",
        [
            x.fill(
                'The {b} may order {subject} (the "Products") by issuing written purchase orders. Each '
                "purchase order is binding once accepted by the {a} in writing."
            ),
            x.fill(
                "The {a} shall deliver the Products to the delivery point specified in the purchase order "
                "within {notice} of acceptance. Title and risk of loss pass to the {b} upon delivery."
            ),
            x.fill(
                "If the {a} fails to deliver on time, the {b} may, without prejudice to its other remedies, "
                "cancel the affected purchase order in whole or in part."
            ),
        ],
    ),
    "loan": lambda r, x: (
        "The Loan",
        [
            x.fill(
                'The Lender agrees to lend to the Borrower the principal sum of {amount} (the "Loan") to be '
                "used solely for {subject}."
            ),
            x.fill(
                "The Loan bears interest at a fixed rate of "
                + r.pick(("five percent (5%)", "six and one-half percent (6.5%)", "eight percent (8%)"))
                + " per annum, calculated on the basis of a 365-day year and the actual number of days "
                "elapsed."
            ),
            x.fill(
                "The Borrower shall repay the Loan in equal monthly installments over {years}, "
                "and may prepay all or part of the Loan at any time without premium or penalty."
            ),
        ],
    ),
    "appointment": lambda r, x: (
        "Appointment",
        [
            x.fill(
                "The {a} appoints the {b} as its "
                + r.pick(("exclusive", "non-exclusive"))
                + ' distributor of {subject} (the "Products") in the Territory, and the {b} accepts the '
                "appointment."
            ),
            x.fill(
                "The {b} shall use commercially reasonable efforts to promote and sell the Products "
                "throughout the "
                "Territory and shall not actively seek customers for the Products outside the Territory."
            ),
            x.fill(
                "The {b} shall purchase Products with an aggregate value of not less than {amount} in each "
                'contract year (the "Minimum Purchase Commitment").'
            ),
        ],
    ),
    "covenants": lambda r, x: (
        "Covenants and Events of Default",
        [
            (
                "So long as any amount remains outstanding under the Loan, the Borrower shall:",
                [
                    "deliver annual financial statements within one hundred twenty (120) days after the "
                    "end of "
                    "each fiscal year;",
                    "maintain insurance on its assets with reputable insurers; and",
                    "not create any lien over its assets other than liens permitted in writing by the "
                    "Lender.",
                ],
            ),
            x.fill(
                "Each of the following is an Event of Default: failure to pay any amount within {notice} "
                "after "
                "its due date; breach of any covenant in "
                + x.ref("covenants", "(a)")
                + "; or the insolvency of the Borrower."
            ),
            "Upon an Event of Default, the Lender may declare all amounts outstanding immediately due and "
            "payable.",
        ],
    ),
}

# Common clauses that make no sense for a kind of agreement (an NDA has no fees).
EXCLUDE = {
    "nda": {"fees", "ip", "indemnification", "warranties", "insurance", "audit", "data"},
    "lease": {"ip", "data", "non_solicit"},
    "loan": {"ip", "indemnification", "warranties", "data", "non_solicit", "publicity"},
    "distribution": {"ip"},
}
COMMON: list[tuple[str, Clause, float]] = [  # key, clause, probability of inclusion
    ("fees", c_fees, 0.85),
    ("confidentiality", c_confidentiality, 0.8),
    ("ip", c_ip, 0.4),
    ("warranties", c_warranties, 0.6),
    ("indemnification", c_indemnification, 0.6),
    ("liability", c_liability, 0.7),
    ("force", c_force_majeure, 0.5),
    ("assignment", c_assignment, 0.5),
    ("notices", c_notices, 0.5),
    ("non_solicit", c_non_solicit, 0.25),
    ("insurance", c_insurance, 0.25),
    ("audit", c_audit, 0.25),
    ("data", c_data_protection, 0.25),
    ("compliance", c_compliance, 0.25),
    ("publicity", c_publicity, 0.2),
    ("law", c_law, 1.0),
    ("general", c_general, 0.7),
]


def _render_sub(label: str, sub: Sub) -> str:
    if isinstance(sub, str):
        return f"({label}) {sub}"
    text, items = sub
    lines = [f"({label}) {text}"] + [f"    ({_roman(i + 1).lower()}) {it}" for i, it in enumerate(items)]
    return "\n".join(lines)


def contract(r: Rand) -> str:
    """A complete contract: title, preamble, recitals, numbered sections and a signature block."""
    x = Ctx(r, r.pick(tuple(AGREEMENTS)))
    keys: list[tuple[str, Clause]] = [("definitions", c_definitions)] if r.chance(0.7) else []
    specific = AGREEMENTS[x.kind].specific
    keys += [(p, c_specific(p)) for p in specific]
    excluded = EXCLUDE.get(x.kind, set())
    keys += [(k, c) for k, c, p in COMMON if k not in excluded and (k == "law" or r.chance(p))]
    keys.insert(len(keys) - 2 if keys[-1][0] == "general" else len(keys) - 1, ("term", c_term))
    # Cap the length at a few thousand characters by keeping the specific clauses and law.
    while len(keys) > 9:
        drop = [i for i, (k, _) in enumerate(keys) if k not in ("law", "term", *specific)]
        keys.pop(drop[r.below(len(drop))])
    x.sections = {k: i + 1 for i, (k, _) in enumerate(keys)}

    out = [x.title, ""]
    out.append(
        f'This {x.title.title()} (this "Agreement") is entered into as of {x.date} (the "Effective Date") '
        "by and "
        f"between {x.party_a}, {_an(x.place_a)} {x.place_a} {x.kind_a} with its principal place of "
        "business at "
        f'{_address(r, x.place_a)} (the "{x.a}"), and {x.party_b}, {_an(x.place_b)} {x.place_b} {x.kind_b} '
        "with its principal "
        f'place of business at {_address(r, x.place_b)} (the "{x.b}"). The {x.a} and the {x.b} are each a '
        f'"Party" and together the "Parties".'
    )
    out.append("")
    out += _recitals(r, x)
    out.append("")
    for n, (_key, clause) in enumerate(keys, start=1):
        heading, subs = clause(r, x)
        out.append(f"{n}. {heading.upper() if r.chance(0.3) else heading}")
        if len(subs) == 1 and isinstance(subs[0], str):
            out.append(f"{n}.1 {subs[0]}")
        else:
            out += [_render_sub(chr(ord("a") + i), s) for i, s in enumerate(subs)]
        out.append("")
    out += _signatures(r, x)
    return "\n".join(out) + "\n"


def _recitals(r: Rand, x: Ctx) -> list[str]:
    pool = {
        "nda": f"WHEREAS, the Parties wish to explore {x.subject}, and in doing so each Party may disclose "
        "Confidential Information to the other;",
        "services": f"WHEREAS, the {x.a} is in the business of providing {x.subject};",
        "license": f"WHEREAS, the {x.a} owns or controls all rights in {x.subject};",
        "lease": f"WHEREAS, the {x.a} is the owner of {x.subject} and wishes to lease it to the {x.b};",
        "consulting": f"WHEREAS, the {x.a} has expertise in {x.subject};",
        "supply": f"WHEREAS, the {x.a} manufactures and sells {x.subject};",
        "loan": f"WHEREAS, the {x.b} has requested a loan for {x.subject};",
        "distribution": f"WHEREAS, the {x.a} manufactures {x.subject} and wishes to appoint a distributor in "
        f'{x.territory} (the "Territory");',
    }
    verb = r.pick(("engage", "obtain the services of", "enter into an arrangement with"))
    second = {
        "nda": "WHEREAS, the Parties wish to protect the confidentiality of the information so disclosed;",
        "loan": f"WHEREAS, the {x.a} is willing to make the loan on the terms and conditions set out below;",
        "lease": f"WHEREAS, the {x.b} wishes to lease the premises from the {x.a} on the terms set out "
        "below;",
    }.get(x.kind, f"WHEREAS, the {x.b} wishes to {verb} the {x.a} on the terms set out below;")
    return [
        "RECITALS" if r.chance(0.5) else "BACKGROUND",
        "",
        pool[x.kind],
        second,
        "",
        "NOW, THEREFORE, in consideration of the mutual covenants and agreements set out herein, and for "
        "other good "
        "and valuable consideration, the receipt and sufficiency of which are hereby acknowledged, the "
        "Parties "
        "agree as follows:",
    ]


def _signatures(r: Rand, x: Ctx) -> list[str]:
    lines = [
        "IN WITNESS WHEREOF, the Parties have caused this Agreement to be executed by their duly "
        "authorized "
        "representatives as of the Effective Date.",
        "",
    ]
    for party in (x.party_a, x.party_b):
        lines += [party.upper(), f"By: {_person(r)}", f"Title: {r.pick(TITLES)}", f"Date: {x.date}", ""]
    return lines[:-1]


# ---------------------------------------------------------------------------------------------------
# Statutes
# ---------------------------------------------------------------------------------------------------


# subject, the regulated person, the protected thing, the agency, duties, prohibited acts, exceptions
@dataclass(frozen=True)
class Statute:
    """The subject matter of one generated act."""

    name: str
    actor: str  # the regulated person
    thing: str  # what the act protects or regulates
    agency: str
    defs: dict[str, str]
    duties: list[str]
    prohibited: list[str]
    exceptions: list[str]
    exc_intro: str = "do not apply to"


_STATUTE_DATA: tuple[dict, ...] = (
    {
        "name": "Consumer Data Protection",
        "actor": "controller",
        "thing": "personal data",
        "agency": "the Office of the Data Protection Commissioner",
        "defs": {
            "controller": "a person that, alone or jointly with others, determines the purposes and "
            "means "
            "of processing personal data",
            "consumer": "a natural person who is a resident of this State acting only in an "
            "individual or "
            "household context",
            "personal data": "any information that is linked or reasonably linkable to an identified or "
            "identifiable natural person",
            "sale": "the exchange of personal data for monetary or other valuable consideration",
        },
        "duties": [
            "limit the collection of personal data to what is adequate, relevant and reasonably "
            "necessary for the purposes disclosed to the consumer",
            "establish and maintain reasonable administrative, technical and physical data security "
            "practices",
            "provide consumers with a clear and accessible privacy notice",
        ],
        "prohibited": [
            "process personal data in violation of state or federal laws that prohibit unlawful "
            "discrimination",
            "process sensitive data concerning a consumer without obtaining the consumer's consent",
            "engage in the sale of personal data of a consumer known to be under sixteen years of age",
        ],
        "exc_intro": "do not prohibit a controller from taking any action necessary to",
        "exceptions": [
            "comply with a subpoena or court order",
            "protect the life or physical safety of a natural person",
            "prevent or detect security incidents, fraud or other illegal activity",
        ],
    },
    {
        "name": "Unmanned Aircraft Operations",
        "actor": "operator",
        "thing": "unmanned aircraft",
        "agency": "the Department of Transportation",
        "defs": {
            "operator": "a person who manipulates the flight controls of an unmanned aircraft",
            "unmanned aircraft": "an aircraft operated without the possibility of direct human "
            "intervention from within or on the aircraft",
            "critical infrastructure": "a power plant, water treatment facility, airport, prison or "
            "similar facility designated by rule",
        },
        "duties": [
            "register each unmanned aircraft weighing more than 250 grams with the Department",
            "maintain visual line of sight with the unmanned aircraft at all times during flight",
            "yield the right of way to all manned aircraft",
        ],
        "prohibited": [
            "operate an unmanned aircraft over critical infrastructure at an altitude of less than 400 feet",
            "operate an unmanned aircraft while under the influence of alcohol or drugs",
            "use an unmanned aircraft to capture images of a person in a place where that "
            "person has "
            "a reasonable expectation of privacy",
        ],
        "exceptions": [
            "a law enforcement agency acting under a warrant",
            "an emergency response to a fire, flood or other disaster",
            "an operator acting with the written consent of the owner of the property",
        ],
    },
    {
        "name": "Residential Security Deposit",
        "actor": "landlord",
        "thing": "security deposit",
        "agency": "the Attorney General",
        "defs": {
            "landlord": "the owner or lessor of a dwelling unit, or a person authorized to manage it",
            "security deposit": "any money paid by a tenant to secure the performance of a rental "
            "agreement, other than rent paid in advance",
            "tenant": "a person entitled under a rental agreement to occupy a dwelling unit",
        },
        "duties": [
            "hold each security deposit in a separate interest-bearing account",
            "provide the tenant with a written receipt stating the amount of the deposit",
            "return the security deposit, with any accrued interest, within thirty days after the "
            "termination of the tenancy",
        ],
        "prohibited": [
            "demand a security deposit in excess of one and one-half months' rent",
            "retain any portion of a security deposit for normal wear and tear",
            "fail to provide an itemized list of deductions",
        ],
        "exceptions": [
            "a tenancy in a hotel or motel for fewer than thirty consecutive days",
            "housing provided by an employer to an employee as part of employment",
            "a dwelling unit in a building with two or fewer units, one of which is occupied by the owner",
        ],
    },
    {
        "name": "Food Labeling Transparency",
        "actor": "manufacturer",
        "thing": "packaged food",
        "agency": "the Department of Health",
        "defs": {
            "manufacturer": "a person who produces, processes or packages food for sale",
            "label": "any written, printed or graphic matter on or accompanying a food package",
            "major allergen": "milk, eggs, fish, shellfish, tree nuts, peanuts, wheat, soybeans or sesame",
        },
        "duties": [
            "state on the label the common name of the food and the net quantity of its contents",
            "list every ingredient in descending order of predominance by weight",
            "identify each major allergen contained in the food in a separate statement",
        ],
        "prohibited": [
            "sell packaged food bearing a label that is false or misleading in any particular",
            "describe a food as natural if it contains artificial flavoring or synthetic color",
            "remove or alter a label before the food is sold to the consumer",
        ],
        "exceptions": [
            "food prepared and served for immediate consumption on the premises",
            "raw agricultural commodities sold directly by the grower",
            "food shipped in bulk for further processing",
        ],
    },
    {
        "name": "Cybersecurity Incident Reporting",
        "actor": "covered entity",
        "thing": "information systems",
        "agency": "the Office of Cybersecurity",
        "defs": {
            "covered entity": "a business that owns or operates critical infrastructure in this State",
            "cyber incident": "an occurrence that actually jeopardizes the integrity, confidentiality "
            "or "
            "availability of an information system",
            "ransom payment": "the transmission of money or other property to a person in connection "
            "with a ransomware attack",
        },
        "duties": [
            "report a substantial cyber incident to the Office within seventy-two hours after "
            "reasonably believing that the incident has occurred",
            "report any ransom payment within twenty-four hours after the payment is made",
            "preserve data relevant to the incident for not less than two years",
        ],
        "prohibited": [
            "knowingly submit a false or misleading report",
            "destroy records relating to a cyber incident after a report has been filed",
            "retaliate against an employee for reporting a cyber incident",
        ],
        "exceptions": [
            "an incident that did not affect any information system of the covered entity",
            "a report that would compromise an ongoing criminal investigation, upon written "
            "request "
            "of a law enforcement agency",
            "an entity with fewer than fifty employees",
        ],
    },
    {
        "name": "Water Conservation",
        "actor": "water supplier",
        "thing": "potable water",
        "agency": "the State Water Resources Board",
        "defs": {
            "water supplier": "a public or private system that provides potable water to more than "
            "three "
            "thousand service connections",
            "drought emergency": "a condition declared by the Governor under Section 301",
            "outdoor irrigation": "the application of water to landscaped areas by any means",
        },
        "duties": [
            "adopt a water shortage contingency plan and review it every five years",
            "meter every service connection and bill customers on the basis of the volume delivered",
            "report monthly production and consumption data to the Board",
        ],
        "prohibited": [
            "permit outdoor irrigation between the hours of 10 a.m. and 6 p.m. during a drought emergency",
            "allow runoff from irrigation onto sidewalks, streets or gutters",
            "use potable water to wash a driveway or other paved surface",
        ],
        "exceptions": [
            "the watering of food crops",
            "use of water for fire suppression or public safety",
            "hand watering with a hose equipped with an automatic shut-off nozzle",
        ],
    },
)
STATUTES = tuple(Statute(**d) for d in _STATUTE_DATA)
STATE_NAMES = ("Delaware", "Oregon", "Vermont", "Nebraska", "Maine", "Nevada", "Iowa", "Kentucky", "Arizona")


def statute(r: Rand) -> str:
    """A short act: numbered sections with subsections, items and internal cross-references."""
    st = r.pick(STATUTES)
    chapter = r.between(2, 60)
    base = r.between(1, 9) * 100  # section numbers run base+1, base+2, ...
    year = r.between(2008, 2025)
    actor, thing, agency = st.actor, st.thing, st.agency
    a_actor = f"{_an(actor)} {actor}"
    num = {
        k: base + i
        for i, k in enumerate(("title", "defs", "duties", "proh", "exc", "pen", "enf", "sev", "eff"), 1)
    }
    out = [
        f"TITLE {_roman(r.between(1, 40))}. {st.name.upper()}",
        f"CHAPTER {chapter}. {st.name} Act",
        "",
        f"An Act relating to {thing}; establishing duties of each {actor}; providing for enforcement by "
        f"{agency}; and prescribing penalties.",
        "",
        f"Be it enacted by the Legislature of the State of {r.pick(STATE_NAMES)}:",
        "",
        f"Section {num['title']}. Short title.",
        f'This Act may be cited as the "{st.name} Act of {year}".',
        "",
        f"Section {num['defs']}. Definitions.",
        "As used in this Act, unless the context otherwise requires:",
    ]
    for i, term in enumerate(sorted(st.defs)):
        out.append(f'({i + 1}) "{_cap(term)}" means {st.defs[term]}.')
    out += ["", f"Section {num['duties']}. Duties of {a_actor}.", f"(a) Each {actor} shall:"]
    out += _items(st.duties, "and", roman=True)
    out.append(
        f"(b) {agency[0].upper() + agency[1:]} may, by rule, prescribe the form and manner in which a "
        f"{actor} "
        f"shall comply with subsection (a)({_roman(r.between(1, len(st.duties))).lower()})."
    )
    out += [
        "",
        f"Section {num['proh']}. Prohibited acts.",
        f"(a) Except as provided in Section {num['exc']}, {a_actor} may not:",
    ]
    out += _items(st.prohibited, "or", roman=True)
    out.append(
        f"(b) A violation of subsection (a)({_roman(r.between(1, len(st.prohibited))).lower()}) committed "
        "knowingly "
        f"constitutes a separate violation for each day on which it continues."
    )
    out += [
        "",
        f"Section {num['exc']}. Exceptions.",
        f"(a) Sections {num['duties']} and {num['proh']} {st.exc_intro}:",
    ]
    out += _items(st.exceptions, "or", roman=False)
    out.append(
        "(b) A person who claims an exception under subsection (a) bears the burden of proving that the "
        "exception "
        "applies."
    )
    civil = r.between(1, 20) * 500
    out += [
        "",
        f"Section {num['pen']}. Penalties.",
        f"(a) {_cap(a_actor)} who violates Section {num['duties']}(a) is liable for a civil penalty of not "
        "more "
        "than "
        f"${civil:,} for each violation.",
        f"(b) {_cap(a_actor)} who violates Section {num['proh']}(a):",
        f"    (i) for a first violation, is liable for a civil penalty of not more than ${civil * 2:,}; and",
        "    (ii) for a second or subsequent violation within five years, is liable for a civil penalty "
        "of not "
        f"more than ${civil * 5:,}.",
        "(c) In determining the amount of a penalty under subsection (b)(ii), the court shall consider the "
        "nature "
        "and seriousness of the violation, the number of persons affected and any good faith efforts to "
        "comply.",
        "",
        f"Section {num['enf']}. Enforcement.",
        f"(a) {_cap(agency)} has exclusive authority to enforce this Act.",
        f"(b) Before bringing an action for a violation of Section {num['duties']} or Section {num['proh']}, "
        f"{agency} shall provide the {actor} with written notice identifying the specific provisions "
        "alleged to "
        f"have been violated. If within {num_words(r.pick((30, 45, 60)))} days the {actor} cures the "
        "violation "
        "and provides an express written statement that the violation has been cured, no action may be "
        "brought, "
        f"except as provided in Section {num['pen']}(b)(ii).",
        "(c) This Act does not create a private right of action.",
        "",
        f"Section {num['sev']}. Severability.",
        "If any provision of this Act or its application to any person or circumstance is held invalid, the "
        "invalidity does not affect other provisions or applications of the Act that can be given effect "
        "without "
        "the invalid provision or application, and to this end the provisions of this Act are severable.",
        "",
        f"Section {num['eff']}. Effective date.",
        f"This Act takes effect on {r.pick(('January 1', 'July 1', 'October 1'))}, {year + 1}.",
    ]
    return "\n".join(out) + "\n"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _items(items: list[str], conj: str, roman: bool) -> list[str]:
    """An indented list: "(i) ...;", ..., "(ii) ...; and", "(iii) ..."."""
    out = []
    for i, item in enumerate(items):
        label = _roman(i + 1).lower() if roman else str(i + 1)
        end = "." if i == len(items) - 1 else f"; {conj}" if i == len(items) - 2 else ";"
        out.append(f"    ({label}) {item}{end}")
    return out


# ---------------------------------------------------------------------------------------------------
# Licences and the generator
# ---------------------------------------------------------------------------------------------------


def licence_chunks() -> list[str]:
    """Chunks of real licence texts from the shipped asset, in their stored order."""
    data = resources.files("flexmoe").joinpath("assets/licenses.jsonl.xz").read_bytes()
    return [json.loads(line)["text"] for line in lzma.decompress(data).decode("utf-8").splitlines()]


def documents(r: Rand) -> Iterator[str]:
    """An endless stream of legal documents.

    Contracts and statutes are generated; about ``LICENCE_SHARE`` of the documents are real licence
    chunks (in shuffled order), until those run out.
    """
    licences = licence_chunks()
    r.shuffle(licences)
    while True:
        if licences and r.chance(LICENCE_SHARE):
            yield licences.pop()
        else:
            yield contract(r) if r.chance(0.75) else statute(r)


def generate(seed: int, budget: int) -> Iterator[str]:
    """Distinct legal documents until about ``budget`` bytes of UTF-8 text."""
    return until_budget(documents(Rand(seed)), budget)
