"""Second-opinion confidence components, with hand-built answers (adversarial ones included).

Each component is tested alone on answers whose right verdict a person can see, then in
the product, to show what a component changes about the final confidence.
"""

from __future__ import annotations

import math

import pytest

from pipeline.prompts.model import (
    AgreementSpec,
    ConfidenceComponents,
    ConsistencySpec,
    FieldLogprobSpec,
    GroundingSpec,
    SupportSpec,
)
from pipeline.stages.grounding import Source, printed_dates, printed_numbers, support
from pipeline.stages.score import (
    MISMATCH_FACTOR,
    Evidence,
    agreement,
    combine,
    consistency,
    field_logprob,
    grounding,
    score,
    second_opinions,
    text_support,
)

TICKET = {
    "subject": "Charged twice for March",
    "body": "My card was charged twice for the March invoice INV-3391. "
    "Please refund the duplicate payment of $49.00.",
}
INVOICE = {
    "text": "Brightline Consulting Ltd\nInvoice #: BL-7790\nSubtotal: 2,000.00\n"
    "VAT 20%: 400.00\nTotal due: £2.400,00\nDue date: 14 May 2024\n"
}


# -- agreement ----------------------------------------------------------------------


def test_agreement_with_the_rule_counts_nothing_against_the_answer() -> None:
    assert agreement({"label": "billing"}, {"label": "billing"}, ["label"]) == 1.0


def test_each_disagreeing_key_field_multiplies_by_the_mismatch_factor() -> None:
    output = {"label": "feature_request", "priority": "low"}
    rule = {"label": "billing", "priority": "normal"}
    assert agreement(output, rule, ["label"]) == MISMATCH_FACTOR
    assert agreement(output, rule, ["label", "priority"]) == MISMATCH_FACTOR**2


def test_a_rule_without_an_opinion_is_not_counted() -> None:
    # The rule left the field out (or returned None as a whole: no opinion at all).
    assert agreement({"label": "billing"}, {"summary": "x"}, ["label"]) is None
    assert agreement({"label": "billing"}, {"label": None}, ["label"]) is None
    evidence = Evidence(output={"label": "bug"}, variables=TICKET, opinion=None)
    spec = ConfidenceComponents(agreement=AgreementSpec(fields=["label"]))
    assert "agreement" not in second_opinions(spec, evidence)


def test_a_label_that_agrees_with_the_rule_by_chance_does_not_make_an_invented_answer_sure() -> (
    None
):
    """The keyword rule says billing ("payment" appears) and so does the model, but the model's
    summary is invented: agreement can only ever leave confidence where it was, so the
    other components still pull this answer under a 0.6 threshold."""
    variables = {
        "subject": "Office visit",
        "body": "Do you have an office in Lisbon? Payment of our visit costs is not an issue.",
    }
    output = {
        "label": "billing",
        "priority": "low",
        "summary": "We offer free shipping for orders with 12 Rue de Rivoli.",
    }
    spec = ConfidenceComponents(
        agreement=AgreementSpec(fields=["label"]),
        support=SupportSpec(fields=["summary"]),
    )
    opinions = second_opinions(
        spec, Evidence(output=output, variables=variables, opinion={"label": "billing"})
    )
    assert opinions["agreement"] == 1.0
    assert opinions["support"] < 0.1
    confidence, _ = score([], [], "stop", [], second_opinions=opinions)
    assert confidence < 0.6


def test_agreement_compares_as_a_reader_would() -> None:
    assert agreement({"n": "INV-1 "}, {"n": "inv-1"}, ["n"]) == 1.0
    assert agreement({"t": 10}, {"t": 10.0}, ["t"]) == 1.0
    assert agreement({"c": ["a", "b"]}, {"c": ["b", "a"]}, ["c"]) == 1.0
    assert agreement({"f": True}, {"f": 1}, ["f"]) == MISMATCH_FACTOR


# -- grounding: extractive values -----------------------------------------------------


def test_extractive_values_printed_in_the_input_are_grounded() -> None:
    output = {"invoice_number": "BL-7790", "total": 2400.0, "currency": "GBP", "due_date": None}
    assert grounding(output, Source.of(INVOICE), ["invoice_number", "total", "due_date"]) == 1.0


def test_a_computed_total_and_a_wrong_date_are_not_grounded() -> None:
    output = {"invoice_number": "BL-7790", "total": 2000.4, "due_date": "2024-05-15"}
    value = grounding(output, Source.of(INVOICE), ["invoice_number", "total", "due_date"])
    assert value == MISMATCH_FACTOR**2


def test_grounding_normalises_case_separators_and_date_formats() -> None:
    source = Source.of(
        {"text": "Rechnung Nr. re 88120, zahlbar bis 03.04.2024, Summe 3.480,00 EUR"}
    )
    output = {"n": "RE-88120", "total": 3480, "due": "2024-04-03"}
    assert grounding(output, source, ["n", "total", "due"]) == 1.0
    assert "2024-05-14" in printed_dates("due May 14th, 2024")
    assert 1234.5 in printed_numbers("USD 1'234.50")


def test_null_and_missing_values_are_the_schemas_business() -> None:
    assert grounding({"due_date": None}, Source.of(INVOICE), ["due_date", "absent"]) is None


# -- support: free text ---------------------------------------------------------------


def test_a_faithful_summary_is_supported() -> None:
    output = {"summary": "Customer was charged twice for the March invoice and asks for a refund."}
    value = text_support(output, Source.of(TICKET), SupportSpec(fields=["summary"]))
    assert value == 1.0


def test_an_invented_summary_is_not_supported() -> None:
    output = {"summary": "We offer a free shipping option for orders with 12 Rue de Rivoli."}
    measured = support(output["summary"], Source.of(TICKET))
    assert measured.ratio is not None and measured.ratio < 0.2
    assert {"12", "Rue", "Rivoli"} <= set(measured.invented)
    value = text_support(output, Source.of(TICKET), SupportSpec(fields=["summary"]))
    assert value is not None and value < 0.05


def test_a_grounded_looking_summary_with_one_invented_number_loses_confidence() -> None:
    """Every word is from the ticket except one figure: the kind of error that does harm."""
    faithful = {"summary": "Charged twice for the March invoice; refund of the $49.00 duplicate."}
    invented = {"summary": "Charged twice for the March invoice; refund of the $94.00 duplicate."}
    spec = SupportSpec(fields=["summary"], invented_penalty=0.5)
    source = Source.of(TICKET)
    assert text_support(faithful, source, spec) == 1.0
    assert support(invented["summary"], source).invented == ("94.00",)
    assert text_support(invented, source, spec) == 0.5


def test_names_at_the_start_of_a_sentence_are_not_inventions() -> None:
    measured = support("Refund requested. Duplicate payment on the card.", Source.of(TICKET))
    assert measured.invented == ()


# -- consistency ----------------------------------------------------------------------


def test_consistency_is_the_share_of_samples_that_agree_on_the_key_fields() -> None:
    answer = {"label": "bug", "priority": "high"}
    same = {"label": "bug", "priority": "normal"}
    other = {"label": "billing", "priority": "high"}
    assert consistency(answer, [same, same, same], ["label"]) == 1.0
    assert consistency(answer, [other, other], ["label"]) == MISMATCH_FACTOR
    # One of three agrees, one disagrees, one could not be parsed (counts as disagreeing).
    value = consistency(answer, [same, other, None], ["label"])
    assert value == pytest.approx(MISMATCH_FACTOR + (1 - MISMATCH_FACTOR) / 3, abs=1e-6)
    evidence = Evidence(output=answer, variables={}, samples=[other, other, other])
    spec = ConfidenceComponents(consistency=ConsistencySpec(fields=["label"], samples=3))
    assert second_opinions(spec, evidence)["consistency"] == MISMATCH_FACTOR


# -- field logprobs -------------------------------------------------------------------

# What llama.cpp returned for one answer (tokens and logprobs as the API gave them).
TOKENS = ['{"', "label", '":', ' "', "feature", "_", "request", '",', ' "', "summary", '":', ' "']
TOKENS += ["A", " customer", " charged", " twice", '."', "}"]
LOGPROBS = [-0.3, -0.15, -0.03, -0.05, -0.5, -0.0, -0.003, -0.09, -0.0, -0.7, -0.02, -0.04]
LOGPROBS += [-3.1, -2.0, -2.1, -0.3, -1.0, -0.01]
TEXT = "".join(TOKENS)


def test_field_logprob_reads_only_the_tokens_of_the_key_fields_value() -> None:
    output = {"label": "feature_request", "summary": "A customer charged twice."}
    value = field_logprob(TEXT, TOKENS, LOGPROBS, output, ["label"])
    assert value == pytest.approx(math.exp(-0.5 - 0.0 - 0.003), abs=1e-6)
    whole = math.exp(sum(LOGPROBS) / len(LOGPROBS))
    assert value is not None and value > 0.6 > whole  # the summary's tokens are not the decision


def test_field_logprob_needs_tokens_that_spell_the_answer() -> None:
    output = {"label": "feature_request"}
    assert field_logprob(TEXT, [], [], output, ["label"]) is None
    assert field_logprob(TEXT + " ", TOKENS, LOGPROBS, output, ["label"]) is None
    assert field_logprob(TEXT, TOKENS, LOGPROBS, {"label": "bug"}, ["label"]) is None


def test_field_logprob_replaces_the_whole_answer_logprob() -> None:
    output = {"label": "feature_request", "summary": "A customer charged twice."}
    spec = ConfidenceComponents(field_logprob=FieldLogprobSpec(fields=["label"]))
    evidence = Evidence(
        output=output, variables={}, text=TEXT, tokens=TOKENS, token_logprobs=LOGPROBS
    )
    opinions = second_opinions(spec, evidence)
    _, components = score(LOGPROBS, [], "stop", [], second_opinions=opinions)
    assert "logprob" not in components and "field_logprob" in components
    _, baseline = score(LOGPROBS, [], "stop", [])
    assert "logprob" in baseline


# -- weights ----------------------------------------------------------------------------


def test_weights_are_exponents_and_zero_records_without_counting() -> None:
    components = {"agreement": 0.25, "format": 1.0}
    assert combine(components, {}) == 0.25
    assert combine(components, {"agreement": 0.5}) == 0.5
    assert combine(components, {"agreement": 0.0}) == 1.0
    assert combine({"agreement": 0.0}, {"agreement": 0.5}) > 0.0  # the floor keeps weights usable


def test_grounding_spec_in_the_product() -> None:
    output = {"invoice_number": "BL-7790", "total": 2000.0}
    spec = ConfidenceComponents(grounding=GroundingSpec(fields=["invoice_number", "total"]))
    opinions = second_opinions(spec, Evidence(output=output, variables=INVOICE))
    assert opinions == {"grounding": 1.0}  # 2,000.00 is printed (the subtotal): grounded
    wrong = {"invoice_number": "BL-7791", "total": 2000.0}
    opinions = second_opinions(spec, Evidence(output=wrong, variables=INVOICE))
    assert opinions == {"grounding": MISMATCH_FACTOR}
