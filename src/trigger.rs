//! The trigger function `outbox.publish()`: `CREATE TRIGGER ... AFTER ...
//! FOR EACH ROW EXECUTE FUNCTION outbox.publish('/topic/x' [, 'key=value'])`.
//!
//! Vocabulary: a trigger's *spec* is its parsed arguments (destination and
//! options), cached per trigger OID for the life of the backend; its *shape*
//! says how a row becomes the body (the whole row, a *projection* onto the
//! `fields=` columns, or a *serializer* function) and is resolved against the
//! table's current columns, re-resolved when they change. Rows become jsonb
//! through direct calls to `to_jsonb` (no SPI), and the row is written by
//! the enqueue module's saved plan.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::pg_guard;
use pgrx::pg_sys;

use crate::enqueue::{self, Message};
use crate::error::{OutboxError, TriggerProblem};
use crate::fmgr::finfo_v1;
use crate::headers::{self, Headers};

finfo_v1!(pg_finfo_outbox_publish_trigger);

/// `outbox.publish() RETURNS trigger`
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_publish_trigger(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let context = unsafe { (*fcinfo).context };
    if context.is_null() || unsafe { (*context).type_ } != pg_sys::NodeTag::T_TriggerData {
        OutboxError::Trigger {
            trigger: "outbox.publish()".into(),
            problem: TriggerProblem::NotTrigger,
        }
        .raise();
    }
    let td = context.cast::<pg_sys::TriggerData>();
    if let Err(problem) = unsafe { fire(td) } {
        let label = unsafe { label(td) };
        OutboxError::Trigger {
            trigger: label,
            problem,
        }
        .raise();
    }
    pg_sys::Datum::from(0)
}

/// `trigger "name" on table "schema.table"`, for error messages.
unsafe fn label(td: *const pg_sys::TriggerData) -> String {
    unsafe {
        let name = CStr::from_ptr((*(*td).tg_trigger).tgname).to_string_lossy();
        format!(
            "trigger \"{name}\" on table \"{}\"",
            table_name((*td).tg_relation)
        )
    }
}

unsafe fn table_name(rel: pg_sys::Relation) -> String {
    unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        let nsp = if nsp.is_null() {
            "?".into()
        } else {
            CStr::from_ptr(nsp).to_string_lossy()
        };
        let rel = CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy();
        format!("{nsp}.{rel}")
    }
}

unsafe fn fire(td: *const pg_sys::TriggerData) -> std::result::Result<(), TriggerProblem> {
    let event = unsafe { (*td).tg_event };
    if event & pg_sys::TRIGGER_EVENT_ROW == 0 {
        return Err(TriggerProblem::StatementLevel);
    }
    if event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER {
        return Err(TriggerProblem::NotAfter);
    }
    let (op, tuple) = unsafe {
        match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => ("INSERT", (*td).tg_trigtuple),
            pg_sys::TRIGGER_EVENT_UPDATE => ("UPDATE", (*td).tg_newtuple),
            pg_sys::TRIGGER_EVENT_DELETE => ("DELETE", (*td).tg_trigtuple),
            _ => return Err(TriggerProblem::StatementLevel),
        }
    };
    let trigger = unsafe { &*(*td).tg_trigger };
    let rel = unsafe { (*td).tg_relation };
    let desc = unsafe { (*rel).rd_att };

    SPECS.with(|specs| {
        let mut specs = specs.borrow_mut();
        let args = unsafe { trigger_args(trigger) };
        let spec = match specs.get_mut(&trigger.tgoid.to_u32()) {
            Some(s) if s.args == args => s,
            _ => {
                let spec = Spec::parse(args)?;
                specs.insert(trigger.tgoid.to_u32(), spec);
                specs
                    .get_mut(&trigger.tgoid.to_u32())
                    .expect("just inserted")
            }
        };
        let body = unsafe { spec.body(rel, desc, tuple)? };
        enqueue::check_size(body).map_err(|e| TriggerProblem::Input(Box::new(e)))?;
        let table = unsafe { table_name(rel) };
        enqueue::write(&Message {
            destination: &spec.wire,
            version: spec.version.as_deref(),
            body,
            user_headers: &spec.headers,
            trigger: Some((op, &table)),
            delay: None,
        });
        Ok(())
    })
}

unsafe fn trigger_args(t: &pg_sys::Trigger) -> Vec<String> {
    (0..t.tgnargs as usize)
        .map(|i| unsafe {
            CStr::from_ptr(*t.tgargs.add(i))
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

thread_local! {
    static SPECS: RefCell<HashMap<u32, Spec>> = RefCell::new(HashMap::new());
    static TO_JSONB: std::cell::Cell<*mut pg_sys::FmgrInfo> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// A trigger's parsed arguments and how its rows become bodies.
struct Spec {
    args: Vec<String>,
    wire: String,
    version: Option<String>,
    headers: Headers,
    fields: Option<Vec<String>>,
    serializer: Option<String>,
    shape: Shape,
}

enum Shape {
    Unresolved,
    Row,
    Projection(Projection),
    Serializer(Serializer),
}

/// The `fields=` columns (plus `id`) as a record type of their own.
struct Projection {
    columns: Vec<(i16, String, pg_sys::Oid)>,
    desc: pg_sys::TupleDesc,
}

struct Serializer {
    /// Row type it was resolved for, and the role it was checked for.
    rowtype: pg_sys::Oid,
    user: pg_sys::Oid,
    name: String,
    finfo: *mut pg_sys::FmgrInfo,
}

impl Spec {
    fn parse(args: Vec<String>) -> std::result::Result<Spec, TriggerProblem> {
        let input = |e: OutboxError| TriggerProblem::Input(Box::new(e));
        let Some(destination) = args.first() else {
            return Err(TriggerProblem::NoDestination);
        };
        let destination = enqueue::check_destination(Some(destination))
            .map_err(input)?
            .to_string();
        let (mut fields, mut version, mut serializer, mut headers) = (None, None, None, None);
        for opt in &args[1..] {
            let Some((key, value)) = opt.split_once('=') else {
                return Err(TriggerProblem::MalformedOption(opt.clone()));
            };
            let slot = match key.trim() {
                "fields" => &mut fields,
                "version" => &mut version,
                "serializer" => &mut serializer,
                "headers" => &mut headers,
                _ => return Err(TriggerProblem::UnknownOption(key.trim().to_string())),
            };
            if slot.replace(value.trim().to_string()).is_some() {
                return Err(TriggerProblem::DuplicateOption(key.trim().to_string()));
            }
        }
        let wire = enqueue::wire_destination(&destination, version.as_deref()).map_err(input)?;
        let headers = match headers {
            None => Vec::new(),
            Some(text) => {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| TriggerProblem::HeadersJson(e.to_string()))?;
                headers::from_json(&value).map_err(input)?
            }
        };
        let fields = fields.map(|f| {
            let mut names: Vec<String> = f
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            names.dedup();
            names
        });
        if matches!(&fields, Some(f) if f.is_empty()) {
            return Err(TriggerProblem::EmptyOption("fields".into()));
        }
        if matches!(&serializer, Some(s) if s.is_empty()) {
            return Err(TriggerProblem::EmptyOption("serializer".into()));
        }
        Ok(Spec {
            args,
            wire,
            version,
            headers,
            fields,
            serializer,
            shape: Shape::Unresolved,
        })
    }

    /// The row as the message body (a jsonb datum).
    unsafe fn body(
        &mut self,
        rel: pg_sys::Relation,
        desc: pg_sys::TupleDesc,
        tuple: pg_sys::HeapTuple,
    ) -> std::result::Result<pg_sys::Datum, TriggerProblem> {
        unsafe {
            if !self.shape_fits(rel, desc) {
                self.shape = self.resolve(rel, desc)?;
            }
            match &self.shape {
                Shape::Row | Shape::Unresolved => {
                    Ok(to_jsonb(pg_sys::heap_copy_tuple_as_datum(tuple, desc)))
                }
                Shape::Projection(p) => {
                    let n = (*desc).natts as usize;
                    let mut values = vec![pg_sys::Datum::from(0); n];
                    let mut nulls = vec![false; n];
                    pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
                    let mut pv: Vec<pg_sys::Datum> = Vec::with_capacity(p.columns.len());
                    let mut pn: Vec<bool> = Vec::with_capacity(p.columns.len());
                    for (attnum, _, _) in &p.columns {
                        pv.push(values[*attnum as usize - 1]);
                        pn.push(nulls[*attnum as usize - 1]);
                    }
                    let row = pg_sys::heap_form_tuple(p.desc, pv.as_mut_ptr(), pn.as_mut_ptr());
                    Ok(to_jsonb(pg_sys::heap_copy_tuple_as_datum(row, p.desc)))
                }
                Shape::Serializer(s) => {
                    let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
                    call_serializer(s, row)
                }
            }
        }
    }

    /// Whether the resolved shape still matches the table and the role.
    unsafe fn shape_fits(&self, rel: pg_sys::Relation, desc: pg_sys::TupleDesc) -> bool {
        unsafe {
            match &self.shape {
                Shape::Unresolved => false,
                Shape::Row => true,
                Shape::Projection(p) => p.columns.iter().all(|(attnum, name, typ)| {
                    column(desc, *attnum).is_some_and(|(n, t)| &n == name && t == *typ)
                }),
                Shape::Serializer(s) => {
                    s.rowtype == (*(*rel).rd_rel).reltype
                        && s.user == pg_sys::GetUserId()
                        && pg_sys::SearchSysCacheExists(
                            pg_sys::SysCacheIdentifier::PROCOID as i32,
                            pg_sys::Datum::from((*s.finfo).fn_oid),
                            pg_sys::Datum::from(0),
                            pg_sys::Datum::from(0),
                            pg_sys::Datum::from(0),
                        )
                }
            }
        }
    }

    unsafe fn resolve(
        &self,
        rel: pg_sys::Relation,
        desc: pg_sys::TupleDesc,
    ) -> std::result::Result<Shape, TriggerProblem> {
        unsafe {
            if let Some(name) = &self.serializer {
                return resolve_serializer(name, (*(*rel).rd_rel).reltype).map(Shape::Serializer);
            }
            let Some(fields) = &self.fields else {
                return Ok(Shape::Row);
            };
            let natts = (*desc).natts as i16;
            let find = |name: &str| {
                (1..=natts).find_map(|a| {
                    column(desc, a)
                        .filter(|(n, _)| n == name)
                        .map(|(n, t)| (a, n, t))
                })
            };
            let mut columns = Vec::new();
            if let Some(id) = find("id") {
                columns.push(id);
            }
            for f in fields {
                if columns.iter().any(|(_, n, _)| n == f) {
                    continue;
                }
                columns.push(find(f).ok_or_else(|| TriggerProblem::UnknownField(f.clone()))?);
            }
            // The projected record type outlives this call: build it in
            // TopMemoryContext and register it (BlessTupleDesc).
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let pdesc = pg_sys::CreateTemplateTupleDesc(columns.len() as i32);
            for (i, (attnum, _, _)) in columns.iter().enumerate() {
                pg_sys::TupleDescCopyEntry(pdesc, (i + 1) as i16, desc, *attnum);
            }
            let pdesc = pg_sys::BlessTupleDesc(pdesc);
            pg_sys::MemoryContextSwitchTo(old);
            Ok(Shape::Projection(Projection {
                columns,
                desc: pdesc,
            }))
        }
    }
}

/// Name and type of a live column, None for a dropped or missing one.
unsafe fn column(desc: pg_sys::TupleDesc, attnum: i16) -> Option<(String, pg_sys::Oid)> {
    unsafe {
        if attnum < 1 || attnum as i32 > (*desc).natts {
            return None;
        }
        let att = &*attribute(desc, (attnum - 1) as usize);
        if att.attisdropped {
            return None;
        }
        Some((
            CStr::from_ptr(att.attname.data.as_ptr())
                .to_string_lossy()
                .into_owned(),
            att.atttypid,
        ))
    }
}

/// The i-th (0-based) attribute of a tuple descriptor.
unsafe fn attribute(desc: pg_sys::TupleDesc, i: usize) -> *const pg_sys::FormData_pg_attribute {
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::TupleDescAttr(desc, i as i32)
    }
    #[cfg(not(feature = "pg18"))]
    unsafe {
        (*desc).attrs.as_ptr().add(i)
    }
}

/// Looks up `name(rowtype)` as the calling role sees it (search_path) and
/// checks that it returns jsonb and that the role may execute it.
unsafe fn resolve_serializer(
    name: &str,
    rowtype: pg_sys::Oid,
) -> std::result::Result<Serializer, TriggerProblem> {
    use pgrx::spi::Spi;
    let row_type_name: String = Spi::get_one_with_args(
        "SELECT pg_catalog.format_type($1, NULL)",
        &[pgrx::datum::DatumWithOid::from(rowtype)],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| "record".into());
    let signature = format!("{name}({row_type_name})");
    let found: Option<(Option<pg_sys::Oid>, Option<String>, Option<bool>)> =
        Spi::get_three_with_args(
            "SELECT p.oid, pg_catalog.format_type(p.prorettype, NULL), \
                pg_catalog.has_function_privilege(p.oid, 'EXECUTE') \
         FROM pg_catalog.pg_proc p WHERE p.oid = pg_catalog.to_regprocedure($1)",
            &[pgrx::datum::DatumWithOid::from(signature.as_str())],
        )
        .ok();
    let Some((Some(oid), Some(returns), Some(may_execute))) = found else {
        return Err(TriggerProblem::NoSerializer(signature));
    };
    if returns != "jsonb" {
        return Err(TriggerProblem::SerializerReturns {
            name: signature,
            returns,
        });
    }
    if !may_execute {
        return Err(TriggerProblem::SerializerPermission(signature));
    }
    unsafe {
        let finfo =
            pg_sys::MemoryContextAllocZero(pg_sys::TopMemoryContext, size_of::<pg_sys::FmgrInfo>())
                .cast::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info_cxt(oid, finfo, pg_sys::TopMemoryContext);
        Ok(Serializer {
            rowtype,
            user: pg_sys::GetUserId(),
            name: signature,
            finfo,
        })
    }
}

unsafe fn call_serializer(
    s: &Serializer,
    row: pg_sys::Datum,
) -> std::result::Result<pg_sys::Datum, TriggerProblem> {
    unsafe {
        let size =
            size_of::<pg_sys::FunctionCallInfoBaseData>() + size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size).cast::<pg_sys::FunctionCallInfoBaseData>();
        (*fcinfo).flinfo = s.finfo;
        (*fcinfo).nargs = 1;
        (*fcinfo).fncollation = pg_sys::InvalidOid;
        let args = (*fcinfo).args.as_mut_slice(1);
        args[0] = pg_sys::NullableDatum {
            value: row,
            isnull: false,
        };
        let f = (*s.finfo).fn_addr.expect("fmgr_info sets fn_addr");
        let result = pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| f(fcinfo));
        if (*fcinfo).isnull {
            return Err(TriggerProblem::SerializerNull(s.name.clone()));
        }
        Ok(result)
    }
}

/// `to_jsonb(record)` by direct call. `to_jsonb` reads its argument type
/// from the call expression, so the FmgrInfo carries one saying "record";
/// the datum's own header names the actual row type.
unsafe fn to_jsonb(row: pg_sys::Datum) -> pg_sys::Datum {
    unsafe {
        let mut finfo = TO_JSONB.with(|f| f.get());
        if finfo.is_null() {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            finfo = pg_sys::palloc0(size_of::<pg_sys::FmgrInfo>()).cast();
            let oid = pg_sys::fmgr_internal_function(c"to_jsonb".as_ptr());
            pg_sys::fmgr_info(oid, finfo);
            let arg = pg_sys::makeNullConst(pg_sys::RECORDOID, -1, pg_sys::InvalidOid);
            let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
            let call = pg_sys::makeFuncExpr(
                oid,
                pg_sys::JSONBOID,
                args,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            );
            (*finfo).fn_expr = call.cast();
            pg_sys::MemoryContextSwitchTo(old);
            TO_JSONB.with(|f| f.set(finfo));
        }
        pg_sys::FunctionCall1Coll(finfo, pg_sys::InvalidOid, row)
    }
}
