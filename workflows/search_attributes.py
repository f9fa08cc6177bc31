"""Custom search attributes that operators filter on in the Temporal UI."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

CARRIER_ID = SearchAttributeKey.for_keyword("CarrierId")
COUNTRY_CODE = SearchAttributeKey.for_keyword("CountryCode")
PRODUCT_ID = SearchAttributeKey.for_keyword("ProductId")
SUBSCRIPTION_STATUS = SearchAttributeKey.for_keyword("SubscriptionStatus")
# what an operator must look at: unsettled | credentials_rejected | configuration
BILLING_ISSUE = SearchAttributeKey.for_keyword("BillingIssue")

ALL = (CARRIER_ID, COUNTRY_CODE, PRODUCT_ID, SUBSCRIPTION_STATUS, BILLING_ISSUE)
