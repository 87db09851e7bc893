"""The review page ``safeclip serve --review STORE`` serves at ``GET /review``: one self-contained HTML document.

It asks for the server's bearer token and the reviewer's name (kept in the tab's ``sessionStorage`` only), claims
items from ``/v1/review/next``, shows the thumbnail (fetched with the token, shown through a ``blob:`` URL), the
decided action, each category's probability and thresholds and the decision's reasons, and posts the verdict
(buttons, or the keys ``a`` / ``f`` / ``b``; ``n`` skips the item: it goes to the back of the queue, and the next
one is claimed). Everything shown from the server is set as text, never parsed as HTML. The Content-Security-Policy
allows only this page's own script and style (by their hashes), ``blob:`` images and requests to the same origin.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["PAGE", "PAGE_HEADERS"]

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5rem auto; max-width: 62rem; padding: 0 1rem; color: #222; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; }
label { display: block; margin: .4rem 0; }
input[type=text], input[type=password] { width: 22rem; max-width: 100%; }
#error { color: #a00; font-weight: 600; white-space: pre-wrap; }
#status { color: #555; }
.item { display: flex; gap: 1.5rem; flex-wrap: wrap; }
.thumb { width: 256px; min-height: 64px; border: 1px solid #ccc; display: flex; align-items: center;
         justify-content: center; color: #777; }
.thumb img { max-width: 256px; max-height: 256px; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .2rem .6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.allow { color: #176317; } .flag { color: #8a5a00; } .block { color: #a00; }
.verdict button { font-size: 1rem; margin-right: .4rem; padding: .3rem .9rem; }
kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 .25rem; font-size: .85em; }
.small { font-size: .85em; color: #555; word-break: break-all; }
"""

_BODY = """
<h1>safeclip review</h1>
<p id="error" role="alert" hidden></p>
<form id="login" hidden>
  <label>Bearer token <input id="token" type="password" autocomplete="off" required></label>
  <label>Reviewer <input id="reviewer" type="text" autocomplete="username" required maxlength="200"></label>
  <button id="start" type="submit">Start reviewing</button>
</form>
<section id="panel" hidden>
  <p><span id="who" class="small"></span> <button id="signout" type="button">Sign out</button></p>
  <p id="status" role="status"></p>
  <div id="item" hidden>
    <div class="item">
      <div class="thumb" id="thumb">no thumbnail</div>
      <div>
        <p>Decided: <strong id="action"></strong> <span id="itemid" class="small"></span></p>
        <p id="decision-error" class="block" hidden></p>
        <table id="categories">
          <thead><tr><th>Category</th><th>Probability</th><th>Flag at</th><th>Block at</th><th>Action</th></tr></thead>
          <tbody></tbody>
        </table>
        <p>Reasons: <span id="reasons"></span></p>
        <p id="meta" class="small"></p>
      </div>
    </div>
    <div class="verdict">
      <label>Category <select id="category"><option value="">(none)</option></select></label>
      <label>Note <input id="note" type="text" maxlength="2000"></label>
      <p>
        <button id="allow" type="button" class="allow">Allow <kbd>a</kbd></button>
        <button id="flag" type="button" class="flag">Flag <kbd>f</kbd></button>
        <button id="block" type="button" class="block">Block <kbd>b</kbd></button>
        <button id="next" type="button">Skip <kbd>n</kbd></button>
      </p>
    </div>
  </div>
</section>
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const store = window.sessionStorage;
let item = null;
let busy = false;
let thumbUrl = null;

function setText(el, value) { el.textContent = value === null || value === undefined ? "" : String(value); }
function showError(message) { setText($("error"), message); $("error").hidden = !message; }
function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "-"; }
// fetch sends a header's characters as bytes: the token's UTF-8 bytes, as the server compares them
function utf8(s) { return unescape(encodeURIComponent(s)); }

function showLogin() {
  $("panel").hidden = true;
  $("login").hidden = false;
  $("token").value = store.getItem("safeclip.token") || "";
  $("reviewer").value = store.getItem("safeclip.reviewer") || "";
  $(store.getItem("safeclip.token") ? "reviewer" : "token").focus();
}

async function api(path, options) {
  const opts = Object.assign({cache: "no-store", credentials: "omit"}, options || {});
  opts.headers = Object.assign({"Authorization": "Bearer " + utf8(store.getItem("safeclip.token") || "")},
                               opts.headers || {});
  const response = await fetch(path, opts);
  if (response.ok) return response;
  let message = "HTTP " + response.status;
  try {
    const body = await response.json();
    if (body && body.error) message += " " + body.error.type + ": " + body.error.message;
  } catch (e) { /* not JSON: the status says enough */ }
  if (response.status === 401) showLogin();
  throw new Error(message);
}

function clearItem() {
  item = null;
  $("item").hidden = true;
  if (thumbUrl) { URL.revokeObjectURL(thumbUrl); thumbUrl = null; }
  $("thumb").replaceChildren(document.createTextNode("no thumbnail"));
}

function render(it) {
  const d = it.decision || {};
  setText($("action"), d.action || it.action);
  $("action").className = d.action || it.action;
  setText($("itemid"), "item " + it.id);
  setText($("decision-error"), d.error ? "error: " + d.error : "");
  $("decision-error").hidden = !d.error;
  const rows = [];
  const select = $("category");
  select.replaceChildren(new Option("(none)", ""));
  for (const [name, c] of Object.entries(d.categories || {})) {
    const tr = document.createElement("tr");
    tr.dataset.category = name;
    const cells = [name, fmt(c.probability), fmt(c.flag_threshold), fmt(c.block_threshold), c.action];
    cells.forEach((value, i) => {
      const td = document.createElement("td");
      setText(td, value);
      if (i > 0 && i < 4) td.className = "num";
      if (i === 4) td.className = String(value);
      tr.appendChild(td);
    });
    rows.push(tr);
    select.appendChild(new Option(name, name));
  }
  $("categories").tBodies[0].replaceChildren(...rows);
  setText($("reasons"), (d.reasons || []).length ? d.reasons.join(", ") : "none");
  setText($("meta"), "policy " + it.policy + " \\u00b7 sha256 " + it.sha256 + " \\u00b7 from " + it.origin +
          (it.source ? " (" + it.source + ")" : "") + " \\u00b7 sampled with probability " + it.probability);
  $("note").value = "";
  $("item").hidden = false;
}

async function showThumbnail(it) {
  if (!it.has_thumbnail) return;
  const blob = await (await api("/v1/review/" + it.id + "/thumbnail")).blob();
  if (item !== it) return;  // another item came meanwhile
  thumbUrl = URL.createObjectURL(blob);
  const img = new Image();
  img.alt = "thumbnail of item " + it.id;
  img.src = thumbUrl;
  $("thumb").replaceChildren(img);
}

async function loadNext() {
  if (busy) return;
  busy = true;
  clearItem();
  setText($("status"), "loading\\u2026");
  try {
    const reviewer = store.getItem("safeclip.reviewer") || "";
    const response = await api("/v1/review/next?reviewer=" + encodeURIComponent(reviewer));
    if (response.status === 204) {
      setText($("status"), "queue empty");
    } else {
      item = await response.json();
      setText($("status"), "");
      render(item);
      showError("");
      await showThumbnail(item);
    }
  } catch (e) {
    if ($("status").textContent === "loading\\u2026") setText($("status"), "");
    showError(e.message);
  } finally {
    busy = false;
  }
}

async function decide(action) {
  if (busy || !item) return;
  busy = true;
  const body = {action: action, reviewer: store.getItem("safeclip.reviewer") || ""};
  if ($("category").value) body.category = $("category").value;
  if ($("note").value.trim()) body.note = $("note").value.trim();
  let done = false;
  try {
    await api("/v1/review/" + item.id + "/verdict",
              {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    showError("");
    done = true;
  } catch (e) {
    showError(e.message);
  } finally {
    busy = false;
  }
  if (done) await loadNext();
}

async function skip() {
  if (busy) return;
  if (item) {
    busy = true;
    const reviewer = store.getItem("safeclip.reviewer") || "";
    try {
      await api("/v1/review/" + item.id + "/skip?reviewer=" + encodeURIComponent(reviewer), {method: "POST"});
      showError("");
    } catch (e) {
      showError(e.message);
      return;
    } finally {
      busy = false;
    }
  }
  await loadNext();
}

function start() {
  $("login").hidden = true;
  $("panel").hidden = false;
  setText($("who"), "reviewing as " + store.getItem("safeclip.reviewer"));
  loadNext();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  const reviewer = $("reviewer").value.trim();
  if (!token || !reviewer) { showError("enter the bearer token and your name"); return; }
  store.setItem("safeclip.token", token);
  store.setItem("safeclip.reviewer", reviewer);
  showError("");
  start();
});
$("signout").addEventListener("click", () => {
  store.removeItem("safeclip.token");
  clearItem();
  showLogin();
});
for (const action of ["allow", "flag", "block"]) $(action).addEventListener("click", () => decide(action));
$("next").addEventListener("click", () => skip());
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || $("panel").hidden) return;
  const tag = event.target && event.target.tagName;
  if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
  const action = {a: "allow", f: "flag", b: "block"}[event.key];
  if (action) { event.preventDefault(); decide(action); }
  else if (event.key === "n") { event.preventDefault(); skip(); }
});

if (store.getItem("safeclip.token") && store.getItem("safeclip.reviewer")) start(); else showLogin();
"""


def _source_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


PAGE = ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n<title>safeclip review</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n")

#: Headers of the page: nothing but its own inline script and style runs (CSP by hash), no framing, no caching.
PAGE_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src {_source_hash(_SCRIPT)}; "
                                f"style-src {_source_hash(_STYLE)}; img-src blob:; connect-src 'self'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
