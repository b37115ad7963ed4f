#!/usr/bin/env python3
"""Generate src/sandbox/schema.json, the sandbox's compact copy of the Bot API.

The sandbox answers every Bot API method with a plausible result, checks
required parameters and converts form values to the JSON types Telegram reads
them as. It needs, for each method, its parameters and its return type, and
for each type, its fields. The scraped documentation (tools/botapi-schema.json,
see tools/README.md) holds all that plus prose and HTML we do not need; this
script keeps only the useful part, which the binary embeds.

Usage (stdlib only; the input defaults to botapi-schema.json next to this
script, another schema can be named as the one argument):

    python3 tools/gen_sandbox_schema.py > src/sandbox/schema.json

tests/generated.rs checks that the committed output is what this script writes.

Output layout (keys sorted, one method or type per line, so that diffs of
regenerations are readable):

    {
      "version": "10.2",
      "methods": {"sendMessage": {"returns": "Message",
                                  "params": [["chat_id", "Integer or String", true], ...]}},
      "types":   {"Message": {"fields": [["message_id", "Integer", true, null], ...]},
                  "ChatMemberMember": {"fields": [["status", "String", true, "member"], ...]},
                  "ChatMember": {"one_of": ["ChatMemberOwner", ...]}},
      "update_types": ["message", "edited_message", ...]
    }

A field's fourth element is the constant value documented as "always 'x'"
(the discriminator of union members), or null. A method's "returns" is
recovered from the prose ("On success, the sent Message is returned") as a
type expression: "True", "Message or True", "Array of MessageId", ...
"""

import io
import json
import os
import re
import sys

DEFAULT_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "botapi-schema.json")

PRIMITIVES = {"True", "Boolean", "Integer", "String", "Float"}


def return_type(description, type_names):
    """Recover the return type expression from a method's description."""
    known = type_names | PRIMITIVES
    sentences = re.split(r"(?<=[.!])\s+", description.replace("\n", " "))
    for sentence in sentences:
        if "return" not in sentence.lower():
            continue
        found = []
        for match in re.finditer(r"(?<![A-Za-z])(Array of )?([A-Z][A-Za-z]+)(?![A-Za-z])", sentence):
            name = match.group(2)
            if name not in known or name == "Returns":
                continue
            expr = ("Array of " if match.group(1) else "") + name
            if expr not in found:
                found.append(expr)
        # The first sentence about returning that names a type wins: later
        # ones are notes ("the method will return error 429 ...").
        if found:
            return " or ".join(found)
    return None


def constant_of(description):
    match = re.search(r"always [\"'\u201c\u2018]([a-z_]+)[\"'\u201d\u2019]", description)
    return match.group(1) if match else None


def one_of(description, type_names):
    """Union types list their members as '- Member' lines."""
    members = re.findall(r"^\s*-\s*([A-Z][A-Za-z]+)\s*$", description, flags=re.M)
    return [m for m in members if m in type_names]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_INPUT
    with open(path, encoding="utf-8") as handle:
        schema = json.load(handle)
    children = [child for item in schema["items"] for child in item["children"]]
    type_names = {c["name"] for c in children if c["category"] == "types"}

    types = {}
    for child in children:
        if child["category"] != "types":
            continue
        if child["annotations"]:
            fields = []
            for field in child["annotations"]:
                constant = constant_of(field["description"])
                if field["type"] != "String":
                    constant = None
                fields.append([field["name"], field["type"], bool(field["required"]), constant])
            types[child["name"]] = {"fields": fields}
        else:
            members = one_of(child["description"], type_names)
            types[child["name"]] = {"one_of": members} if members else {"fields": []}

    methods = {}
    unresolved = []
    for child in children:
        if child["category"] != "methods":
            continue
        returns = return_type(child["description"], type_names)
        if returns is None:
            unresolved.append(child["name"])
            returns = "True"
        params = [[p["name"], p["type"], bool(p["required"])] for p in child["annotations"]]
        methods[child["name"]] = {"returns": returns, "params": params}
    if unresolved:
        print("warning: return type not found, assuming True: " + ", ".join(unresolved), file=sys.stderr)

    update_types = [f[0] for f in types["Update"]["fields"] if f[0] != "update_id"]
    out = {
        "version": schema["api"]["version"],
        "methods": methods,
        "types": types,
        "update_types": update_types,
    }
    # UTF-8 with \n line ends whatever the locale and platform, so the output
    # is the same bytes everywhere.
    stream = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n")
    write_by_line(out, stream)
    stream.flush()


def write_by_line(out, stream):
    """Compact JSON with one method or type per line, so that a change of the
    API shows in a diff as the lines of what changed."""

    def compact(value):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    stream.write('{"version":%s,\n' % compact(out["version"]))
    for section in ("methods", "types"):
        entries = sorted(out[section].items())
        stream.write('"%s":{\n' % section)
        stream.write(",\n".join("%s:%s" % (compact(name), compact(value)) for name, value in entries))
        stream.write("\n},\n")
    stream.write('"update_types":%s}\n' % compact(out["update_types"]))


if __name__ == "__main__":
    main()
