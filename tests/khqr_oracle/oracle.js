// The official bakong-khqr SDK as a test oracle: one JSON request a line on stdin, one
// JSON answer a line on stdout, so a whole test session costs one node process.
//   {"op": "generate", "now": ms, "merchant": bool, "info": {...}} -> {"qr", "md5"} | {"error"}
//   {"op": "verify", "now": ms, "qr": "..."}                        -> {"valid", "reason"}
//   {"op": "decode", "qr": "..."}                                   -> {"data"}
// `now` stands in for Date.now(), which the SDK reads for tag 99 and for expiry checks.
"use strict";

const readline = require("readline");
const { BakongKHQR, IndividualInfo, MerchantInfo } = require("bakong-khqr");
// verify() keeps its reason to itself; its validation step says which rule failed.
const validate = require("bakong-khqr/src/controller/decodeValidation");

const realNow = Date.now;

function at(now, work) {
  if (now !== undefined) Date.now = () => now;
  try {
    return work();
  } finally {
    Date.now = realNow;
  }
}

function reasonOf(error) {
  if (error && error.status) return error.status.message;
  return String(error);
}

function generate({ merchant, info }) {
  const optional = info.optional || {};
  const made = merchant
    ? new BakongKHQR().generateMerchant(
        new MerchantInfo(
          info.bakongAccountID,
          info.merchantName,
          info.merchantCity,
          info.merchantID,
          info.acquiringBank,
          optional,
        ),
      )
    : new BakongKHQR().generateIndividual(
        new IndividualInfo(info.bakongAccountID, info.merchantName, info.merchantCity, optional),
      );
  // Some refusals come back as a thrown TypeError stored where the QR would be.
  if (made.status.code !== 0 || typeof made.data.qr !== "string") {
    return { error: made.status.message || reasonOf(made.data && made.data.qr) };
  }
  return { qr: made.data.qr, md5: made.data.md5 };
}

function verify({ qr }) {
  const valid = BakongKHQR.verify(qr).isValid;
  let reason = null;
  if (!valid) {
    try {
      validate(qr);
      reason = "CRC (or fewer than 12 characters)";
    } catch (error) {
      reason = reasonOf(error);
    }
  }
  return { valid, reason };
}

function answer(request) {
  switch (request.op) {
    case "generate":
      return at(request.now, () => generate(request));
    case "verify":
      return at(request.now, () => verify(request));
    case "decode":
      return { data: BakongKHQR.decode(request.qr).data };
    default:
      return { error: `unknown op ${request.op}` };
  }
}

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
  let out;
  try {
    out = answer(JSON.parse(line));
  } catch (error) {
    out = { error: reasonOf(error), crashed: true };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
});
