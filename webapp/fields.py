"""Forms: the base form class, and rendering a field with its label, hint and error (the `field`,
`control` and `form_error` template globals), and the status lines the focus goes to (`status_notice`).

Why not WTForms' widgets through a Jinja macro: that path cost more than half of rendering a page with a few
forms (bench/profile.py; issue #7 "User Settings >= 0.35 of the bare app"). This renders the same markup
(attribute names sorted like WTForms, values escaped, the same validation attributes taken from the
validators' flags) for the field types our forms use, and hands anything else to the WTForms widget.
"""
import functools
import re
import unicodedata

from flask import g
from flask_wtf import FlaskForm
from flask_wtf.form import SUBMIT_METHODS
from flask_wtf.form import _Auto as _AUTO  # the "take it from the request" default of a form's formdata
from markupsafe import Markup, escape
from wtforms.fields import Label
from wtforms.validators import ValidationError

from . import flaskctx


class Form(FlaskForm):
    """The base of every form here. CSRFProtect checks the token of every unsafe request before any view
    runs (security.md 33; a missing or wrong token gets the 400 "Form expired" page), so forms do not
    carry a second CSRF field of their own: that field signed a fresh token for every form built, a tenth
    of the code step's cost. Templates write the token with `csrf_token()`.

    Forms read the submitted form fields only. Flask-WTF's default also takes uploaded files and a JSON body
    in their place: a number, a list or a file where a field expects text made the validators raise (a 500
    from a POST anyone can send), and JSON strings bypassed the NUL check on form values. Such a body
    now leaves every field empty, which each form refuses with its usual messages."""

    class Meta:
        csrf = False

        def wrap_formdata(self, form, formdata):
            if formdata is not _AUTO:
                return formdata
            # An empty form is None, as in Flask-WTF: the fields keep their defaults and say they are required.
            here = flaskctx.request_context()
            made = here.request if here is not None else None
            return (made.form or None) if made is not None and made.method in SUBMIT_METHODS else None

    def is_submitted(self):
        """Flask-WTF's (a request is under way and its method sends a form), without its two reads through
        Flask's proxies (webapp/flaskctx.py)."""
        here = flaskctx.request_context()
        return here is not None and here.request.method in SUBMIT_METHODS


# Characters that names (device names, a ticket reference) may not hold: controls, invisible format
# characters (zero-width spaces, the bidirectional overrides that make text read backwards), private-use and
# surrogate code points, line and paragraph separators. The zero-width joiner and non-joiner stay where they
# join something (_joins_visibly): emoji such as "👩‍💻" and ordinary Persian spelling are built with them.
HIDDEN_CATEGORIES = {"Cc", "Cf", "Co", "Cs", "Zl", "Zp"}
JOINERS = "\u200c\u200d"
# Free text (support's reason, a contact message) is more lenient: format characters that real text carries
# (right-to-left and left-to-right marks in Hebrew or Arabic, soft hyphens pasted from web pages, the tags of
# flag emoji) are fine, and the Support page shows those that hide or reorder text as escapes (revealed).
# Refused there: controls other than line breaks and tabs, private-use and surrogate code points, line and
# paragraph separators, and the embeddings, overrides and isolates that make a stored text display in another
# order than it was written.
_FREE_TEXT_REFUSED = {"Cc", "Co", "Cs", "Zl", "Zp"}
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# Characters that show nothing although they are not format characters (Unicode's Default_Ignorable_Code_Point
# outside the category Cf): the combining grapheme joiner, the Hangul fillers, Khmer's inherent vowels, the
# Mongolian and general variation selectors, and code points kept unassigned for more of the same (U+2065,
# U+FFF0-FFF8, the rest of U+E0000-E0FFF), which browsers draw as nothing. "vi\u034fctim" reads "victim".
_INVISIBLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x2065, 0x2065),
                     (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))
# The invisible characters that real names need, next to the right neighbours (see _joins_visibly): the
# joiners (emoji "👩‍💻", Persian spelling) and the variation selectors (emoji "❤️", Mongolian letters, the
# variant forms of Japanese kanji).
_SELECTORS = frozenset(chr(c) for c in [*range(0xFE00, 0xFE10), *range(0x180B, 0x180E), 0x180F,
                                        *range(0xE0100, 0xE01F0)])
# Alphabets whose letters pass for each other's (a Unicode character's name begins with its script's name):
# an invisible character between two of their letters hides in a word (lookalike_problem uses it too).
CONFUSABLE_SCRIPTS = {"LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC"}
# Lower-case Cyrillic and Greek letters that read as Latin ones, with the letter each passes for: a word
# written wholly in them ("аӏісе") passes for a Latin word (models.lookalike_problem, settings._same_name).
LATIN_LOOKALIKES = {"а": "a", "е": "e", "і": "i", "ј": "j", "о": "o", "к": "k", "р": "p", "с": "c", "у": "y",
                    "х": "x", "ѕ": "s", "ӏ": "l", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y", "α": "a",
                    "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "υ": "u", "χ": "x"}
# Capitals that read as Latin ones, also those whose lower-case letter does not ("В" reads "B", "в" no letter).
LATIN_LOOKALIKE_CAPITALS = {"А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
                            "С": "C", "Т": "T", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ү": "Y", "Ԛ": "Q",
                            "Ԝ": "W", "Ӏ": "I", "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I",
                            "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X"}
_KEYCAP = "\u20e3"  # "1️⃣" is the digit, U+FE0F and this
# Combining marks stacked on one character: real writing stacks a few (Vietnamese two, pointed Hebrew with
# cantillation four); dozens paint over the lines around them, on the Support page over its own hints.
MAX_STACKED_MARKS = 6


def is_invisible(c):
    """Whether a character shows nothing by itself: a format character (Cf) or one of _INVISIBLE_RANGES."""
    if unicodedata.category(c) == "Cf":
        return True
    code = ord(c)
    return any(low <= code <= high for low, high in _INVISIBLE_RANGES)


def is_mark(c):
    """Whether a character is a combining mark, drawn on the character before it."""
    return unicodedata.category(c) in ("Mn", "Me")


def mixes_alphabets(word):
    """Whether a word holds letters of two of the CONFUSABLE_SCRIPTS: "iPhоne" with a Cyrillic "о" reads as
    the Latin word, and is the classic spoof."""
    return len({unicodedata.name(c, "?").split(" ")[0] for c in word if c.isalpha()} & CONFUSABLE_SCRIPTS) > 1


def has_mixed_alphabet_word(text):
    """Whether a word of `text` mixes alphabets (mixes_alphabets). A word is a run of letters, digits and the
    marks on them: "iPhone-Маши" and "Маша's phone" are words in one alphabet each, as people write."""
    start = 0
    for i, c in enumerate(text + " "):
        if not (c.isalnum() or is_mark(c)):
            if mixes_alphabets(text[start:i]):
                return True
            start = i + 1
    return False


def is_plain_letter(c):
    """Whether a character is ASCII or a letter of one of the CONFUSABLE_SCRIPTS."""
    return c.isascii() or unicodedata.name(c, "?").split(" ")[0] in CONFUSABLE_SCRIPTS


def _joins_visibly(text, i, base):
    """Whether the joiner or selector at text[i] does what real text needs it for: it follows a character that
    is neither ASCII nor a letter of the look-alike alphabets (an emoji, an Arabic, Mongolian or CJK
    character), or it is the U+FE0F of a keycap. After "Work" it would only hide in the word. `base`: the
    index of the last character before i that is not a selector (-1 for none): in "🏳️‍🌈" the joiner follows
    the flag's selector."""
    c = text[i]
    if c not in JOINERS and c not in _SELECTORS:
        return False
    if c == "\ufe0f" and text[i + 1:i + 2] == _KEYCAP:
        return True
    return base >= 0 and not is_invisible(text[base]) and not is_plain_letter(text[base])


def has_hidden_characters(text):
    """Whether a name holds a character from HIDDEN_CATEGORIES or one that shows nothing (is_invisible), other
    than a joiner or selector where real text needs one (_joins_visibly), or a pile of combining marks."""
    # One pass, carrying the last character that is not a selector: walking back from every selector made a
    # run of thousands of them (a 64 KB form field, before its length is refused) cost seconds of CPU.
    base = -1
    for i, c in enumerate(text):
        if (unicodedata.category(c) in HIDDEN_CATEGORIES or is_invisible(c)) and not _joins_visibly(text, i, base):
            return True
        if c not in _SELECTORS:
            base = i
    return has_stacked_marks(text)


def has_disguising_characters(text):
    """Whether free text holds a character that hides or reorders what it says (see _FREE_TEXT_REFUSED), or
    more combining marks on one character than writing needs (MAX_STACKED_MARKS)."""
    return (any(c in _BIDI_CONTROLS or (unicodedata.category(c) in _FREE_TEXT_REFUSED and c not in "\n\t")
                for c in text)
            or has_stacked_marks(text))


def has_stacked_marks(text):
    """Whether more than MAX_STACKED_MARKS combining marks are drawn on one character anywhere in the text.
    Characters that show nothing in between (a zero-width space, a soft hyphen) do not end a pile: the marks
    after them are drawn on the same character."""
    run = 0
    for c in text:
        if is_mark(c):
            run += 1
            if run > MAX_STACKED_MARKS:
                return True
        elif not is_invisible(c):
            run = 0
    return False


# The flag emoji spelled with tag characters that Unicode recommends every platform to show (England, Scotland,
# Wales): U+1F3F4, the subdivision's code in tag letters, CANCEL TAG. Any other run of tag characters shows
# nothing, and spells ASCII text that nobody reading sees (a "flag" of unknown code is such a run too).
_FLAGS = tuple("\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in code) + "\U000e007f"
               for code in ("gbeng", "gbsct", "gbwls"))


@functools.cache
def _hidden_pattern():
    """A regex of the flags above and of runs of the characters has_hidden_characters looks at twice (control,
    format and private-use characters, line and paragraph separators, is_invisible), line breaks and tabs
    aside. Made at its first use (a look at the 135,000 code points of the planes that have format
    characters, some 30 ms), not when every process starts."""
    hidden = HIDDEN_CATEGORIES - {"Co", "Cs"}  # their ranges are fixed, below
    codes = [c for c in (*range(0x20000), *range(0xE0000, 0xE1000)) if unicodedata.category(chr(c)) in hidden]
    ranges = []
    for low, high in sorted([(c, c) for c in codes if c not in (9, 10)] + list(_INVISIBLE_RANGES)
                            + [(0xD800, 0xF8FF), (0xF0000, 0x10FFFF)]):  # surrogates, private use, noncharacters
        if ranges and low <= ranges[-1][1] + 1:
            ranges[-1][1] = max(ranges[-1][1], high)
        else:
            ranges.append([low, high])
    members = "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)
    return re.compile(f"\U0001f3f4(?:{'|'.join(flag[1:] for flag in _FLAGS)})|[{members}]+")


_CHIP = '<code class="hidden-char" dir="ltr">{}</code>'


def revealed(text):
    """`text` as HTML, with every character that shows nothing or changes how the text around it reads written as
    a visible escape (`\\u200b`, as the log and `users activity` write them), a run of them in one box: for
    free text kept for others to read (a contact message on the Support page). The form takes some such
    characters because real text holds them (right-to-left marks, soft hyphens), and older messages hold what
    it now refuses (a right-to-left override). Shown as they are, a zero-width space or a run of tag
    characters (an ASCII text nobody sees) was text the admin could not see, and a bidirectional mark
    reordered what was around it. Kept, as in names (_joins_visibly): the joiners and variation selectors of
    emoji ("👩\\u200d💻", "❤\\ufe0f"), Persian and Mongolian spelling, and the flags of _FLAGS."""
    return Markup(_reveal(text, lambda part: str(escape(part)), _CHIP.format))


def revealed_text(text):
    """`text` as `revealed` shows it, in plain text: each character that shows nothing or reorders the text around
    it written as its escape (`\\u202e`), without the box. For where no markup goes, an attribute (aria-label) or
    a page's <title>: a right-to-left override there reversed the tab's title or the name a screen reader reads.
    Jinja escapes it as any other text."""
    return _reveal(text, str, str)


def revealed_address(email):
    """An address as the admin pages show every address: revealed, inside <bdi> (a right-to-left address does not
    reorder the words around it, nor they it). Every signed-in page shows one, in the layout's "Signed in as":
    an f-string, which costs a third of Markup.format."""
    return Markup(f"<bdi>{revealed(email)}</bdi>")  # revealed's output is escaped already


def _reveal(text, plain, chip):
    """What revealed and revealed_text show of `text`: its ordinary characters through `plain`, the escapes of
    each run of hidden characters through `chip`, the joiners and selectors that join something and the flags
    of _FLAGS as they are (none of them is markup)."""
    if text is None:
        return ""
    if text.isascii() and text.isprintable():  # most addresses and reasons: the pattern cannot match (no control
        return plain(text)                       # character, and no line break to make plain)
    # A line break as a browser sent it (CRLF, or a lone CR) is a line break, not a hidden character: messages
    # stored before the form made them plain newlines (support.text_lines, 2026-12-05) hold one at every line
    # end, and HTML shows either as one break.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts, pos, base = [], 0, -1
    for match in _hidden_pattern().finditer(text):
        start, run = match.start(), match.group()
        if start > pos:  # ordinary characters, none of them a selector
            parts.append(plain(text[pos:start]))
            base = start - 1
        pos = match.end()
        if run.startswith("\U0001f3f4"):  # a flag: what follows joins to it as to any emoji
            parts.append(run)
            base = start
            continue
        if not any(c in JOINERS or c in _SELECTORS for c in run):  # nothing in it joins: all shown, at once
            parts.append(chip(run.encode("unicode_escape").decode("ascii")))
            base = pos - 1
            continue
        shown = []
        for i, c in enumerate(run, start):
            if _joins_visibly(text, i, base):
                if shown:
                    parts.append(chip("".join(shown)))
                    shown = []
                parts.append(c)
            else:
                shown.append(c.encode("unicode_escape").decode("ascii"))
            if c not in _SELECTORS:
                base = i
        if shown:
            parts.append(chip("".join(shown)))
    parts.append(plain(text[pos:]))
    return "".join(parts)


def address(email):
    """An email address as a part of a message (message_html), to be shown as the Support page shows addresses."""
    return {"address": email}


def message_html(message):
    """A message as HTML: a string (or Markup) escaped as Jinja would; a list is a message that names people by
    their addresses, kept as its parts (text, and address() parts) so that a flashed one comes through the
    session (stored as JSON, which keeps no Markup). Its text is escaped, and each address revealed (its hidden
    characters as escapes) inside <bdi>, as the Support page shows addresses everywhere else: flashed as typed,
    a right-to-left override in an address reversed the rest of the line ("... is marked as handled.")."""
    if not isinstance(message, list):
        return escape(message)
    return Markup("").join(revealed_address(part["address"]) if isinstance(part, dict) else escape(part)
                           for part in message)


class VisibleText:
    """Validator for text kept for others to read: a name (HIDDEN_CATEGORIES), or with `lines`, free text of
    several lines (has_disguising_characters). What support writes goes into audit records nobody can edit,
    and a right-to-left override there shows the reason reversed."""

    def __init__(self, message="Use letters, digits, spaces and punctuation only.", lines=False):
        self.message = message
        self.check = has_disguising_characters if lines else has_hidden_characters

    def __call__(self, form, field):
        # After a length already refused (WTForms runs the rest of the chain), one message is enough, and a
        # 64 KB field need not be read character by character.
        if field.data and not field.errors and self.check(field.data):
            raise ValidationError(self.message)


# Attributes a widget takes from the validators' flags (WTForms' `validation_attrs`), per input type.
_TEXT_ATTRS = ("required", "disabled", "readonly", "maxlength", "minlength", "pattern")
_FLAG_ATTRS = {"text": _TEXT_ATTRS, "email": _TEXT_ATTRS, "password": _TEXT_ATTRS, "textarea": _TEXT_ATTRS,
               "checkbox": ("required", "disabled")}


def freeze(form):
    """Mark a form that is only ever shown blank, never filled in or validated (settings._blank_form): the
    markup of each of its fields is then built once and kept on the field. Rendering them was a fifth of a
    User Settings view."""
    for f in form:
        f.kept_markup = {}
        f.label = _KeptLabel(f.label.field_id, f.label.text)
    return form


class _KeptLabel(Label):
    """A frozen field's label: `{{ field.label }}` is rendered once."""

    markup = None

    def __call__(self, text=None, **kwargs):
        if text is not None or kwargs:
            return super().__call__(text, **kwargs)
        if self.markup is None:
            self.markup = super().__call__()
        return self.markup


def _kept(f, key, extra, build):
    """`build(f)`, or the markup kept for `key` and `extra` when `f` belongs to a frozen form (or is one of
    its fields shown under another prefix: see `moved`)."""
    if isinstance(f, _MovedField):
        return f.rename(_kept(f.original, key, extra, build))
    store = getattr(f, "kept_markup", None)
    if store is None:
        return build(f)
    try:
        key += tuple(sorted(extra.items()))
        markup = store.get(key)
    except TypeError:  # an unhashable attribute value: build it each time
        return build(f)
    if markup is None:
        markup = store[key] = build(f)
    return markup


# Placeholders a frozen form may carry in its prefix and data (see `moved`). Control characters never reach
# the markup otherwise: ids are made from fixed prefixes and numbers, and the forms refuse them in text.
ITEM = "\x00"
VALUE = "\x01"


def moved(form, item, value=None):
    """A frozen form built with ITEM in its prefix (and VALUE as its text field's data), shown for one item:
    its kept markup with ITEM replaced by `item` and VALUE by the escaped `value`.

    The settings page shows one rename and one remove form per device. Frozen per device, the forms were
    rebuilt for every person a process showed for the first time (and it kept only so many): about a third
    of such a first User Settings view. Frozen once per form class and renamed here, they cost a string
    replacement per field."""
    subs = [(ITEM, escape(item))]
    if value is not None:
        subs.append((VALUE, escape(value)))
    return _MovedForm(form, subs)


class _MovedForm:
    """A moved form: its fields, each renamed."""

    def __init__(self, form, subs):
        self._form, self._subs = form, subs

    def __getattr__(self, name):
        return _MovedField(getattr(self._form, name), self._subs)


class _MovedField:
    """One field of a moved form: what the templates use of a blank field (markup through `field` and
    `control`, `label`, `id`, no `errors`)."""

    errors = ()

    def __init__(self, original, subs):
        self.original, self._subs = original, subs

    def rename(self, markup):
        text = str(markup)
        for placeholder, replacement in self._subs:
            text = text.replace(placeholder, replacement)
        return Markup(text)

    @property
    def id(self):
        return self.rename(self.original.id)

    @property
    def label(self):
        return self.rename(self.original.label())


def _attrs(values):
    """`name="value"` pairs sorted by name; True gives a bare attribute, False/None leave it out."""
    out = []
    for key in sorted(values):
        value = values[key]
        if value is True:
            out.append(key)
        elif value is not False and value is not None:
            out.append(f'{key}="{escape(value)}"')
    return " ".join(out)


def _kind(f):
    """'text', 'email', 'password', 'checkbox', 'textarea', or None for widgets left to WTForms."""
    widget = f.widget
    name = type(widget).__name__
    if name == "TextArea":
        return "textarea"
    kind = getattr(widget, "input_type", None)
    if kind in ("text", "email", "checkbox") or (kind == "password" and getattr(widget, "hide_value", True)):
        return kind
    return None


def control(f, **extra):
    """The form control alone (<input> or <textarea>), with the field's render_kw and `extra` attributes."""
    return _kept(f, ("control",), extra, lambda fld: _control_markup(fld, _with_focus(fld, list(fld.errors), extra)))


def _with_focus(f, errors, extra):
    """`extra` with autofocus where the person should go next: on the first field with an error on the page
    (a browser focuses it on load without JavaScript, htmx in a swapped fragment: WCAG 3.3.1, 2.4.3), and on
    no other field of a form with errors, even one that asks for it (Email on a sign-in page whose Password
    was left empty: browsers focus the first autofocus in the page)."""
    if errors:
        extra["autofocus"] = not g.get("error_field_focused")
        g.error_field_focused = True
    elif getattr(f, "_form", None) is not None and any(other.errors for other in f._form):
        extra["autofocus"] = False
    return extra


def _control_markup(f, extra):
    kind = _kind(f)
    values = {key.rstrip("_").replace("_", "-") if key.startswith(("aria_", "data_")) else key.rstrip("_"): value
              for key, value in {**(f.render_kw or {}), **extra}.items()}
    if kind is None:
        return f(**values)
    values.setdefault("id", f.id)
    flags = f.flags
    for name in _FLAG_ATTRS[kind]:
        if name not in values:
            value = getattr(flags, name, None)
            if value is not None:
                values[name] = value
    values["name"] = f.name
    if kind == "textarea":
        return Markup(f"<textarea {_attrs(values)}>\r\n{escape(f._value())}</textarea>")
    values.setdefault("type", kind)
    if kind == "checkbox" and f.data:
        values.setdefault("checked", True)
    values["value"] = "" if kind == "password" else values.get("value", f._value())
    return Markup(f"<input {_attrs(values)}>")


def field(f, hint=None, error=None, **extra):
    """A field's block: label, optional hint, control and first error, tied by aria-describedby (WCAG 1.3.1,
    3.3.1)."""
    return _kept(f, ("field", hint, error), extra, lambda fld: _field_markup(fld, hint, error, extra))


def _field_markup(f, hint, error, extra):
    errors = list(f.errors)
    if error:
        errors.append(error)
    _with_focus(f, errors, extra)
    described = []
    if hint:
        described.append(f.id + "-hint")
    if errors:
        described.append(f.id + "-error")
        extra["aria_describedby"] = " ".join(described)
        extra["aria_invalid"] = "true"
        if (f.render_kw or {}).get("autocomplete") == "one-time-code":
            # A refused code comes back empty, ready for the next one: on a phone, deleting six digits
            # first was a chore, and the old code would only be refused again. Also one refused only for
            # the pause after a wrong code: the page cannot tell it from that wrong code sent twice.
            extra["value"] = ""
    elif described:
        extra["aria_describedby"] = described[0]
        extra["aria_invalid"] = "false"
    parts = [f'<div class="field{" has-error" if errors else ""}">',
             f'<label for="{escape(f.id)}">{escape(f.label.text)}</label>']
    if hint:
        parts.append(f'<p class="hint" id="{escape(f.id)}-hint">{escape(hint)}</p>')
    parts.append(_control_markup(f, extra))
    if errors:
        parts.append(f'<p class="error" id="{escape(f.id)}-error">{escape(errors[0])}</p>')
    parts.append("</div>")
    return Markup("\n".join(parts))


def form_error(message, id="form-error"):
    """A form-level error (not tied to one field), announced by screen readers when it appears, and focused
    when a replaced row shows it (app.js); `id` is also for the aria-describedby of a field a page focuses past
    it, and must be unique on the page."""
    return focusable_message(message, id, css="error form-error", role="alert")


def status_notice(message, id, css="notice", autofocus=False):
    """A line saying what an action did, where the focus goes after it: app.js focuses it in a row that
    replaced itself, and `autofocus` does on a page that loads with it (a status line present at load is not
    read out)."""
    return focusable_message(message, id, css=css, role="status", autofocus=autofocus)


def focusable_message(message, id, css, role, autofocus=False):
    """A message that can take the focus, named by its own words. A status or an alert takes no name from its
    text, so Chromium gave the focused line an empty name and a screen reader said only "status" (an
    accessibility-tree review); aria-labelledby pointing at itself makes its words its name."""
    if not message:
        return Markup("")
    class_attr = f' class="{escape(css)}"' if css else ""
    return Markup(f'<p{class_attr} role="{role}" id="{escape(id)}" tabindex="-1" aria-labelledby="{escape(id)}"'
                  f'{" autofocus" if autofocus else ""}>{message_html(message)}</p>')


def username_for_password_managers():
    """For a form that asks the signed-in person's password without their address (Confirm it's you, Change
    password): the address, hidden, so that a password manager knows which of its saved accounts to fill in
    or to update with the new password (Chromium's and Apple's advice for such forms). Not read by any view."""
    from flask_login import current_user

    return Markup(f'<input type="email" name="username" value="{escape(current_user.email)}" '
                  'autocomplete="username" hidden readonly>')
