// twostep: the little JavaScript the pages need (kept in a file so the CSP can forbid inline scripts).

// The 2FA wizard dialog (templates/settings/_wizard_dialog.html). htmx loads it into #dialog-slot; here we
// only open it as a modal, move focus into each new step, close it on Cancel/Done/Escape, and give focus
// back to the gear. Without JavaScript the same steps are plain pages and these handlers never run.
(function () {
  "use strict";
  var opener = null;

  document.addEventListener("htmx:beforeRequest", function (event) {
    var elt = event.detail.elt;
    if (elt && elt.matches && elt.matches("[data-opens-dialog]")) opener = elt;
  });

  // htmx:load fires for every element htmx inserts: a new dialog, or a step that replaced the previous one.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.matches) return;
    var dialog = elt.matches("dialog.wizard") ? elt : elt.closest("dialog.wizard");
    if (!dialog) return;
    if (!dialog.open) dialog.showModal();
    var target = dialog.querySelector(".wizard-step [autofocus]") || dialog.querySelector(".wizard-step .step-title");
    if (target) target.focus();
  });

  // The Two-Factor Authentication row, the sessions list, a person's row on the Support page and the contact
  // requests card replace themselves after a change, taking the button just pressed with them: focus the first
  // field with an error, else the field the answer asks for, else the message saying what happened, so
  // keyboard and screen-reader users are not left on <body>. Not while the wizard is open (its last step
  // refreshes the row out of band, behind the dialog), and not for a list refreshed out of band alongside.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || !elt.matches || !elt.matches("#tfa-row, #sessions, .user-row, #open-requests")) return;
    if (document.querySelector("dialog.wizard[open]")) return;
    var target = elt.querySelector('[aria-invalid="true"]') || elt.querySelector("[autofocus]") ||
      elt.querySelector(".form-error, .notice, [role=status][tabindex]");
    if (target) target.focus();
  });

  // The Support page's results replace themselves a moment after typing in Search users: someone who had
  // tabbed on into the old results (before the answer came) was left on <body>, and the next Tab started at
  // the top of the page. Back to the search field then; the status line says what the new search found.
  document.addEventListener("htmx:load", function (event) {
    var elt = event.detail.elt;
    if (!elt || elt.id !== "results" || (document.activeElement && document.activeElement !== document.body)) return;
    var search = document.getElementById("q");
    if (search) search.focus();
  });

  // A request that gets no answer from the app did nothing visible at all: the network was down, or a proxy
  // in front of the app answered 502/504 itself. (The app's own error answers ask htmx for a reload, which
  // shows them: webapp render_error; htmx swaps no 4xx or 5xx.) Say so where the person is looking, in the
  // open dialog or in the page's messages, and take the note away once a request goes through again.
  function noAnswer(text) {
    var box = document.querySelector("dialog.wizard[open] .wizard-step") || document.getElementById("flashes");
    if (!box) return;
    var note = box.querySelector(".no-answer") || document.createElement("p");
    note.className = "flash error no-answer";
    note.setAttribute("role", "alert");
    note.textContent = text;
    if (!note.parentNode) box.insertBefore(note, box.firstChild);
  }
  document.addEventListener("htmx:sendError", function () {
    noAnswer("The server could not be reached, so nothing was changed. Check your connection, then try again.");
  });
  document.addEventListener("htmx:timeout", function () {
    noAnswer("The server took too long to answer. Try again in a moment.");
  });
  document.addEventListener("htmx:responseError", function (event) {
    var status = event.detail.xhr ? event.detail.xhr.status : 0;
    if (status >= 500) noAnswer("The server could not answer just now (error " + status + "). Try again in a moment.");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (!event.detail.successful) return;
    var notes = document.querySelectorAll(".no-answer");
    for (var i = 0; i < notes.length; i++) notes[i].remove();
  });

  // Times are written in UTC (and stay so without JavaScript); a <time data-local> is shown in the
  // browser's own time zone instead, with the UTC original as its tooltip.
  // data-local="date" shows the date alone. Formats are made on first use: if the browser refused them,
  // the times would stay in UTC and nothing else on the page would break.
  var formats = null;
  function showLocalTimes(root) {
    var times = root.querySelectorAll ? root.querySelectorAll("time[data-local]") : [];
    if (!times.length) return;
    try {
      formats = formats || {
        time: new Intl.DateTimeFormat(undefined, {year: "numeric", month: "short", day: "numeric",
          hour: "numeric", minute: "2-digit", timeZoneName: "short"}),
        date: new Intl.DateTimeFormat(undefined, {year: "numeric", month: "short", day: "numeric"})
      };
    } catch (error) {
      return;
    }
    for (var i = 0; i < times.length; i++) {
      var when = new Date(times[i].getAttribute("datetime"));
      if (isNaN(when.getTime())) continue;
      var format = times[i].getAttribute("data-local") === "date" ? formats.date : formats.time;
      times[i].title = times[i].textContent;
      times[i].textContent = format.format(when);
      // In the browser's language, inside an English page: its own language for a screen reader's voice, and
      // its own direction, kept apart from the words around it. An Arabic date otherwise swapped places with
      // the text beside it ("until" read as if before the event's own time: a review of times).
      times[i].lang = format.resolvedOptions().locale;
      times[i].dir = "auto";
      times[i].removeAttribute("data-local");
    }
  }
  document.addEventListener("DOMContentLoaded", function () { showLocalTimes(document); });
  document.addEventListener("htmx:load", function (event) { if (event.detail.elt) showLocalTimes(event.detail.elt); });

  // A plain form (one htmx does not send) goes once: a second click while the first answer is on its way
  // made the browser drop that answer and send the form again. After a sign-in or "Confirm it's you" the
  // first answer carries the new session's cookie, so the second arrived with the old one and signed the
  // person out; a contact request was stored twice. The mark goes after a while (a stopped page can be sent
  // again) and when the page comes back from the back/forward cache.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    // A form inside [hx-disable] (the wizard as a page) is a plain one too, though it carries hx-post.
    if (!form.matches || (form.matches("[hx-post], [hx-get]") && !form.closest("[hx-disable]")) ||
        event.defaultPrevented) return;
    if ((form.getAttribute("method") || "get").toLowerCase() !== "post") return;
    if (form.hasAttribute("data-sent")) {
      event.preventDefault();
      return;
    }
    form.setAttribute("data-sent", "");
    setTimeout(function () { form.removeAttribute("data-sent"); }, 10000);
  });
  window.addEventListener("pageshow", function (event) {
    // A signed-in page brought back by Back or Forward from the back/forward cache shows what it showed
    // then, and Chromium keeps even no-store pages there while the cookie stays the same: after "Sign out
    // everywhere else" in another browser (or the session's end), Back showed the sessions, the addresses
    // and the activity without asking the server (a history review). It is loaded again, and the server
    // answers as it would now. (Without JavaScript nothing can be done here: README "Security".)
    if (event.persisted && document.getElementById("idle-warning")) {
      location.reload();
      return;
    }
    var sent = document.querySelectorAll("form[data-sent]");
    for (var i = 0; i < sent.length; i++) sent[i].removeAttribute("data-sent");
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("dialog.wizard [data-close-dialog]");
    if (!button) return;
    event.preventDefault();
    button.closest("dialog").close();
  });

  // Escape closes the open disclosure the focus is in (the Support page's disable and End forms, a device's
  // Rename or Remove, Turn off) and puts the focus back on its summary, as Escape closes the wizard's dialog
  // (a support walkthrough: Escape did nothing there). The dialog's own disclosures are left to the dialog.
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape" || event.defaultPrevented || !event.target.closest) return;
    var details = event.target.closest("details[open]");
    if (!details || details.closest("dialog")) return;
    var summary = details.querySelector(":scope > summary");
    if (!summary) return;
    event.preventDefault();
    details.open = false;
    summary.focus();
  });

  // "close" does not bubble: listen in the capture phase. Escape also ends here (native cancel -> close).
  document.addEventListener("close", function (event) {
    var dialog = event.target;
    if (!dialog.matches || !dialog.matches("dialog.wizard")) return;
    dialog.remove();
    var back = opener && document.contains(opener) ? opener : document.querySelector("#tfa-row .gear");
    if (back) back.focus();
    opener = null;
  }, true);
})();

// Warn before a signed-in session ends by itself (WCAG 2.2.1 Timing Adjustable): after 30 minutes without a
// request, or 12 hours after signing in. Someone reading a page that long was signed out without a word.
// The page says how many seconds its session has left (#idle-warning, base.html) and every htmx answer says
// it again (Session-Seconds-Left): only the server knows whether a request moved the end, since it writes
// last_seen_at at most once a minute. Two minutes before the end the warning fills a role=alert region, which
// is announced without moving focus; "Stay signed in" posts /session/extend. Tabs of one browser share one
// session, so each tells the others (localStorage) the end the server gave it: a tab left alone beside one in
// use must not say that the person was signed out.
(function () {
  "use strict";
  var WARN_MS = 2 * 60 * 1000, KEY = "twostep-session-ends";
  var box = document.getElementById("idle-warning");
  if (!box) return;
  var form = box.querySelector("form");
  var main = document.getElementById("main");
  // Where the form goes back to when it is sent without htmx (its script did not load): this page, which the
  // server takes only if it is one of its own (safe_next); without it, User Settings.
  var next = document.createElement("input");
  next.type = "hidden";
  next.name = "next";
  next.value = location.pathname + location.search;
  form.append(next);
  var ends = 0, absoluteEnds = 0, shown = "", timer = null, back = null;

  function learn(left, absoluteLeft) {
    var at = Date.now();
    ends = at + left * 1000;
    absoluteEnds = at + absoluteLeft * 1000;
    try {
      localStorage.setItem(KEY, ends + " " + absoluteEnds);
    } catch (error) { /* storage turned off: this tab counts on its own */ }
    check();
  }

  function inWords(ms) {
    var minutes = Math.round(ms / 60000);
    return ms < 60000 ? "less than a minute" : minutes + (minutes === 1 ? " minute" : " minutes");
  }

  function check() {
    clearTimeout(timer);
    var left = ends - Date.now(), last = absoluteEnds <= ends;  // the 12 hours end it, not idleness
    if (left <= 0) return show(last ? "ended-absolute" : "ended");
    show(left > WARN_MS ? "" : last ? "last" : "warning", left);
    // Checked again at least every 30 s, not after one long wait: timers stop while a laptop sleeps.
    timer = setTimeout(check, Math.min(left > WARN_MS ? left - WARN_MS : left, 30000));
  }

  function show(state, left) {
    if (state === shown) return countDown(left);  // announced once, not at every check
    var hadFocus = box.contains(document.activeElement);
    if (!shown && !hadFocus) back = document.activeElement;  // where the person was when it came
    shown = state;
    // A modal dialog (the 2FA wizard) makes the rest of the page inert: the warning goes into it while shown.
    var home = (state && document.querySelector("dialog[open]")) || main;
    if (box.parentNode !== home) home.insertBefore(box, home.firstChild);
    box.classList.toggle("open", state !== "");
    form.hidden = state !== "warning";
    var old = box.querySelector("[data-warning]");
    if (old) old.remove();
    if (state) box.insertBefore(say(state, left), form);
    // The button just pressed has gone: on to the sign-in link, or back to where the person was when the
    // warning came; not to <body>, nor to the whole of <main> (a screen reader would read all of it): to the
    // page's heading then.
    if (hadFocus && form.hidden) {
      (box.querySelector("a") || (back && back !== document.body && document.contains(back) ? back : heading()))
        .focus();
    }
    // Said in words too, where messages are (a status region): the warning's going alone said nothing.
    if (hadFocus && !state) announce("You are still signed in.");
  }

  function heading() {
    var h1 = main.querySelector("h1");
    if (!h1) return main;
    if (!h1.hasAttribute("tabindex")) h1.setAttribute("tabindex", "-1");
    return h1;
  }

  // Inside the wizard's open dialog, its own status line: the rest of the page, #flashes with it, is inert then.
  function announce(words) {
    var flashes = document.querySelector("dialog[open] [data-dialog-status]") || document.getElementById("flashes");
    if (!flashes) return;
    var line = document.createElement("p");
    line.className = "flash success";
    line.textContent = words;
    flashes.replaceChildren(line);
  }

  // The time left in a warning already shown, kept true at each check ("in 2 minutes" stayed until the end:
  // a review of times). Only the first words were the alert: the region stops being one before they change,
  // or a screen reader would read the whole warning again every half minute.
  function countDown(left) {
    var count = box.querySelector("[data-time-left]");
    if (!count || count.textContent === inWords(left)) return;
    count.closest("[data-warning]").removeAttribute("role");
    count.textContent = inWords(left);
  }

  // A new alert each time (as noAnswer above): one put on the page with its words is announced.
  function say(state, left) {
    var alert = document.createElement("p"), hours = box.getAttribute("data-absolute-hours");
    var count = document.createElement("span");
    count.setAttribute("data-time-left", "");
    count.textContent = inWords(left);
    alert.setAttribute("role", "alert");
    alert.setAttribute("data-warning", "");
    if (state === "warning") {
      alert.append("You will be signed out in ", count, " because nothing has happened here.");
    } else if (state === "last") {
      alert.append("You will be signed out in ", count, ": a session ends " + hours + " hours after signing " +
        "in, and this one cannot be extended.");
    } else {
      var link = document.createElement("a");
      // Signing in again leads back to this page (the server checks that it is one of its own: safe_next).
      link.href = box.getAttribute("data-login-url") + "?next=" + encodeURIComponent(location.pathname + location.search);
      link.textContent = "Log in again.";
      alert.append(state === "ended" ? "You were signed out after " + box.getAttribute("data-idle-minutes") +
        " minutes without activity. " : "You were signed out: a session ends " + hours + " hours after signing in. ",
        link);
    }
    return alert;
  }

  document.addEventListener("htmx:afterRequest", function (event) {
    var xhr = event.detail.xhr, left = xhr && xhr.getResponseHeader("Session-Seconds-Left");
    if (left) learn(Number(left), Number(xhr.getResponseHeader("Session-Absolute-Seconds-Left")));
  });
  window.addEventListener("storage", function (event) {
    var theirs = event.key === KEY && event.newValue ? event.newValue.split(" ").map(Number) : [];
    if (theirs[0] > ends) {  // another tab's request moved the end on
      ends = theirs[0];
      absoluteEnds = theirs[1];
      check();
    }
  });
  document.addEventListener("visibilitychange", check);  // background tabs' timers are slowed down
  // The wizard's dialog is removed when it closes: the warning goes back to the page first.
  document.addEventListener("close", function (event) {
    if (event.target.contains && event.target.contains(box)) main.insertBefore(box, main.firstChild);
  }, true);
  learn(Number(box.getAttribute("data-seconds-left")), Number(box.getAttribute("data-absolute-seconds-left")));
})();
