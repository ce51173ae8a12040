-- Checkout on a phone: Bakong's deep link for the QR of POST /api/v1/khqr (null when it gave
-- none), shown on the payment page as "Open in Bakong".
alter table transactions add column deeplink text;
